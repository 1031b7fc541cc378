"""CRL against established pruning criteria: same dense checkpoint, same parameter budget, same training after it.

    pip install -r bench/requirements.txt
    python bench/compare.py --data /tmp/cifar10-jpeg --subset 5000 --width 0.25 --budgets params=0.1 params=0.3

Rows:
  crl            crl_prune.py's own pipeline (its CLI, --pretrained on the shared dense checkpoint)
  l1-global      L1 norm of filters (Li et al. 2017), ranked across layers       \
  l1-uniform     L1 norm of filters, the same ratio in every layer                 | Torch-Pruning pruners,
  bn-global      BN scaling factors (Network Slimming, Liu et al. 2017), across    | stepped until the
  bn-uniform     BN scaling factors, the same ratio in every layer                 | parameter budget is met
  random-uniform random channels, the same ratio in every layer                   /
CRL trains the weights during its pruning epochs, so every baseline is fine-tuned for prune + finetune epochs with
the same optimiser and schedule (crl_prune.train): equal training after the dense checkpoint for every row.
Each row reports the parameter and MAC fractions it reached, measured on the pruned network.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import crl_prune as crl  # noqa: E402

METHODS = ['crl', 'l1-global', 'l1-uniform', 'bn-global', 'bn-uniform', 'random-uniform']


def importance(method):
    import torch_pruning as tp
    kind = method.split('-')[0]
    if kind == 'l1':  # Li et al.: L1 norm of each filter of the layer that produces the channel
        return tp.importance.MagnitudeImportance(p=1, group_reduction='first')
    if kind == 'bn':
        return tp.importance.BNScaleImportance()
    return tp.importance.RandomImportance()


def tp_prune(model, method, budget, steps=200):
    """Prune `model` in place with Torch-Pruning, one small step at a time, until its parameters meet `budget`
    (a fraction of the dense count). The classifier's outputs are never pruned."""
    import torch_pruning as tp
    dense = crl.measure(model)[0]
    example = torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=importance(method),
                                  global_pruning=method.endswith('global'), pruning_ratio=0.99,
                                  iterative_steps=steps, ignored_layers=[last])
    for _ in range(steps):
        if crl.measure(model)[0] <= budget * dense:
            break
        pruner.step()
    return model


def summary(rows):
    """Mean and spread (population standard deviation) over seeds, per budget and method."""
    table = []
    for budget in dict.fromkeys(r['budget'] for r in rows):
        for method in dict.fromkeys(r['method'] for r in rows):
            rs = [r for r in rows if r['budget'] == budget and r['method'] == method]
            if not rs:
                continue
            acc = [r['accuracy'] for r in rs]
            table.append({'budget': budget, 'method': method, 'seeds': len(rs),
                          'accuracy_mean': statistics.mean(acc), 'accuracy_std': statistics.pstdev(acc),
                          'params_fraction': statistics.mean(r['params_fraction'] for r in rs),
                          'macs_fraction': statistics.mean(r['macs_fraction'] for r in rs),
                          'params': rs[0]['params'], 'prune_s': statistics.mean(r['prune_s'] for r in rs)})
    return table


def markdown(table, dense):
    lines = [f"dense: {dense['params']:,} params, {dense['macs']:,} MACs, accuracy {100 * dense['accuracy']:.2f}%", '',
             '| budget | method | params (fraction) | MACs fraction | accuracy % (mean ± std) | seeds | pruning s |',
             '|---|---|---|---|---|---|---|']
    for t in table:
        lines.append(f"| {t['budget']} | {t['method']} | {t['params']:,} ({t['params_fraction']:.3f}) | "
                     f"{t['macs_fraction']:.3f} | {100 * t['accuracy_mean']:.2f} ± {100 * t['accuracy_std']:.2f} | "
                     f"{t['seeds']} | {t['prune_s']:.1f} |")
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='vgg16')
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--data', required=True, help='ImageFolder directory with train/ and test/')
    p.add_argument('--subset', type=int, default=0)
    p.add_argument('--budgets', nargs='+', default=['params=0.1'])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    p.add_argument('--dense-epochs', type=int, default=30)
    p.add_argument('--prune-epochs', type=int, default=10)
    p.add_argument('--finetune-epochs', type=int, default=20)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--pretrained', help='dense checkpoint to start from (default: train one into OUT/dense)')
    p.add_argument('--crl-args', default='', help='extra crl_prune.py arguments for the CRL rows')
    p.add_argument('--device', default='auto')
    p.add_argument('--out', default='bench/out')
    args = p.parse_args()
    common = ['--arch', args.arch, '--width', str(args.width), '--data', args.data, '--subset', str(args.subset),
              '--batch-size', str(args.batch_size), '--device', args.device, '--log-every', '1000000']

    dense_path = args.pretrained or os.path.join(args.out, 'dense', 'dense.pt')
    if not os.path.exists(dense_path):  # a short CRL run trains and saves the dense checkpoint (--overwrite: a run
        # stopped before it saved dense.pt left no more than its metrics.csv there)
        crl.main([*common, '--dense-epochs', str(args.dense_epochs), '--prune-epochs', '1', '--finetune-epochs', '0',
                  '--overwrite', '--out', os.path.join(args.out, 'dense')])
    targs = crl.parse_args([*common, '--pretrained', dense_path])
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device)
    data = crl.load_data(targs, device)
    dense_model = crl.load_pruned(dense_path, device)
    dp, dm = crl.measure(dense_model)
    dense = {'params': dp, 'macs': dm, 'accuracy': crl.evaluate(dense_model, data)}
    print(f"dense checkpoint {dense_path}: {dense}", flush=True)

    rows_path = os.path.join(args.out, 'rows.json')
    rows = json.load(open(rows_path)) if os.path.exists(rows_path) else []
    done = {(r['budget'], r['method'], r['seed']) for r in rows}
    for budget in args.budgets:
        fraction = crl.parse_budget(budget)['params']
        for seed in args.seeds:
            for method in args.methods:
                if (budget, method, seed) in done:
                    continue
                if method == 'crl':
                    r = crl.main([*common, '--pretrained', dense_path, '--budget', budget, '--seed', str(seed),
                                  '--prune-epochs', str(args.prune_epochs), '--finetune-epochs',
                                  str(args.finetune_epochs), '--overwrite', '--out',
                                  os.path.join(args.out, f"crl-{budget.replace('=', '')}-s{seed}"),
                                  *args.crl_args.split()])
                    params, macs, acc, prune_s = (r['pruned']['params'], r['pruned']['macs'], r['pruned']['accuracy'],
                                                  r['time_s']['prune'])
                    extra = {'accuracy_before_finetune': r['pruned']['accuracy_before_finetune'],
                             'channels': r['channels']}
                else:
                    torch.manual_seed(seed)
                    model = crl.load_pruned(dense_path, device).train()
                    t0 = time.time()
                    tp_prune(model, method, fraction)
                    prune_s = time.time() - t0
                    crl.recalibrate_bn(model, data)  # as crl_prune does before its own pre-fine-tune figure
                    extra = {'accuracy_before_finetune': crl.evaluate(model, data)}
                    crl.train(model, data, args.prune_epochs + args.finetune_epochs, targs.lr, targs, method)
                    params, macs = crl.measure(model)
                    acc = crl.evaluate(model, data)
                row = {'budget': budget, 'method': method, 'seed': seed, 'params': params, 'macs': macs,
                       'params_fraction': params / dp, 'macs_fraction': macs / dm, 'accuracy': acc,
                       'prune_s': prune_s, **extra}
                print(f"ROW {json.dumps(row)}", flush=True)
                rows.append(row)
                with open(rows_path, 'w') as f:
                    json.dump(rows, f, indent=1)
    table = summary(rows)
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump({'dense': dense, 'args': vars(args), 'table': table}, f, indent=1)
    print(markdown(table, dense))


if __name__ == '__main__':
    main()
