"""CRL against the baselines a practitioner would use: same dense checkpoint, same parameter budget, equal training.

    pip install -r bench/requirements.txt
    python bench/compare.py --data /tmp/cifar10-jpeg --subset 5000 --width 0.25 --budgets params=0.1 params=0.3

Rows (D, P, F: --dense-epochs, --prune-epochs, --finetune-epochs; every row starts from the shared dense checkpoint
of D epochs unless it says "from scratch"):
  crl               crl_prune.py's own pipeline: P pruning epochs (the weights train on the sampled sub-networks),
                    then F fine-tuning epochs; --crl-args adds options, --crl-name labels the rows of a variant
  scratch           CRL's kept widths, randomly initialised, trained D + P + F epochs from scratch
  uniform-scratch   the same keep ratio in every layer, the largest that meets the budget, D + P + F from scratch
  crl-widths-l1     CRL's kept widths, each layer keeping its filters of largest L1 norm, fine-tuned P + F epochs
  crl-widths-random CRL's kept widths, random channels, fine-tuned P + F epochs
  tp-group-reg      Torch-Pruning as its CIFAR reproduction (reproduce/main.py, group_sl) configures it: a
                    GroupNormPruner, GroupMagnitudeImportance(p=2, normalizer='max'), sparsity learning for P epochs
                    (pruner.regularize after every backward, --tp-reg 5e-4 as there, no weight decay), then global
                    pruning to the budget, then F fine-tuning epochs
  slimming          Network Slimming (Liu et al. 2017): L1 penalty on the BN scales (--slim-reg 1e-4, the paper's
                    value for VGG) for P epochs, then global pruning by |BN scale| (BNScalePruner, no normalisation)
                    to the budget, then F fine-tuning epochs
  tp-magnitude      Torch-Pruning's MagnitudePruner (L2 group importance, its default 'mean' normaliser, the same
                    ratio in every layer), one shot to the budget, then P + F fine-tuning epochs
  l1-global         L1 norm of filters (Li et al. 2017), ranked across layers       \
  l1-uniform        L1 norm of filters, the same ratio in every layer                 | Torch-Pruning MetaPruner,
  bn-global         BN scaling factors, ranked across layers (normaliser 'mean')      | no sparsity learning,
  bn-uniform        BN scaling factors, the same ratio in every layer                 | fine-tuned P + F epochs
  random-uniform    random channels, the same ratio in every layer                   /
The weights' training in every phase uses crl_prune.train (SGD, Nesterov, cosine from --lr, or from --prune-lr for
the sparsity-learning epochs, as CRL's weights train while pruning), on inputs normalised with the dense checkpoint's
statistics. Every row records its epochs per phase (`epochs`: dense, sparsity, prune, finetune, scratch) and the
parameter and MAC fractions it reached, measured on its network; a row whose fine-tuning diverges (NaN) is recorded
with the accuracy its network then has and the error (`diverged`), and the table counts such seeds. Rows already in
OUT/rows.json are not run again.
With --pretrained, pass the --dense-epochs that checkpoint had, so that the scratch rows get equal training. The CRL
rows take any budget of crl_prune.py; the rows that prune or size a network themselves (uniform-scratch,
tp-group-reg, slimming and the Torch-Pruning criteria) need a parameter budget alone: params=FRACTION or
params=COUNT (e.g. params=90K).
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

METHODS = ['crl', 'scratch', 'uniform-scratch', 'crl-widths-l1', 'crl-widths-random', 'tp-group-reg', 'slimming',
           'tp-magnitude', 'l1-global', 'l1-uniform', 'bn-global', 'bn-uniform', 'random-uniform']
FROM_CRL = ['scratch', 'crl-widths-l1', 'crl-widths-random']  # rows that take the widths of the CRL row


def epochs(method, d, p, f):
    """Epochs of training per phase of a baseline row's final network (the CRL rows read theirs from the run)."""
    if method.endswith('scratch'):
        return {'dense': 0, 'sparsity': 0, 'prune': 0, 'finetune': 0, 'scratch': d + p + f}
    if method in ('tp-group-reg', 'slimming'):
        return {'dense': d, 'sparsity': p, 'prune': 0, 'finetune': f, 'scratch': 0}
    return {'dense': d, 'sparsity': 0, 'prune': 0, 'finetune': p + f, 'scratch': 0}


def uniform_widths(model, fraction):
    """Widths keeping the same ratio r of every group, the largest r whose network meets the parameter budget."""
    params = crl.make_costs(model, ['params'])['params']
    dense = torch.tensor(crl.group_widths(model))
    widths = lambda r: (dense * r).round().clamp(min=1).long()  # noqa: E731
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection: the cost never falls when r grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(widths(mid)[None])[0].item() <= fraction else (lo, mid)
    return widths(lo).tolist()


def channel_masks(model, widths, how, seed):
    """One 0/1 vector per group keeping widths[g] of its channels: those whose filters have the largest L1 norm
    (summed over the layers that produce the group), or random ones."""
    norms = [torch.zeros(w) for w in crl.group_widths(model)]
    for u in crl.units(model):
        if u.out is not None:
            norms[u.out] += u.layer.weight.detach().flatten(1).abs().sum(1).cpu()
    g = torch.Generator().manual_seed(seed)
    scores = [n if how == 'l1' else torch.rand(len(n), generator=g) for n in norms]
    device = next(model.parameters()).device
    return [torch.zeros(len(s)).index_fill_(0, s.topk(k).indices, 1).to(device) for s, k in zip(scores, widths)]


def kept_widths(model, groups=None):
    """Channels of every group, read off the layers (Torch-Pruning shrinks them in place): a network of Units, or
    one whose groups are named by their root layers (`groups`, crl_tp's)."""
    return crl.group_widths(model) if groups is None else [len(model.get_submodule(n).weight) for n in groups]


def pruner(model, method, reg, steps, size=32):
    """A Torch-Pruning pruner for `method` that removes up to 99% of the channels in `steps` steps, traced on
    `size`-px images; the classifier's outputs are never pruned."""
    import torch_pruning as tp
    example = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    kw = dict(pruning_ratio=0.99, iterative_steps=steps,
              ignored_layers=[[m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]])
    if method == 'tp-group-reg':
        imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer='max')  # 'max' for CIFAR, as reproduce/ does
        return tp.pruner.GroupNormPruner(model, example, importance=imp, reg=reg, global_pruning=True, **kw)
    if method == 'slimming':
        imp = tp.importance.BNScaleImportance(normalizer=None)  # one global threshold on |BN scale|
        return tp.pruner.BNScalePruner(model, example, importance=imp, reg=reg, global_pruning=True, **kw)
    if method == 'tp-magnitude':  # Torch-Pruning's MagnitudePruner as its README uses it: L2 group importance
        imp = tp.importance.GroupMagnitudeImportance(p=2)       # (mean over the group), the same ratio in every layer
        return tp.pruner.MagnitudePruner(model, example, importance=imp, global_pruning=False, **kw)
    kind = method.split('-')[0]
    imp = {'l1': lambda: tp.importance.MagnitudeImportance(p=1, group_reduction='first'),  # Li et al.: filter L1
           'bn': tp.importance.BNScaleImportance, 'random': tp.importance.RandomImportance}[kind]()
    return tp.pruner.MetaPruner(model, example, importance=imp, global_pruning=method.endswith('global'), **kw)


def prune_to(model, pruner, fraction):
    """Step `pruner` until the parameters of `model` meet the budget `fraction` of its count now."""
    dense = crl.count(model)[0]  # parameters: the same at any image size
    for _ in range(pruner.iterative_steps):
        if crl.count(model)[0] <= fraction * dense:
            break
        pruner.step()
    return model


def sparsity_learning(model, pruner, data, epochs, targs, name):
    """Train `model` with the pruner's sparsity regulariser added to the gradients before every optimiser step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    hook = register_optimizer_step_pre_hook(lambda opt, a, kw: pruner.regularize(model))
    try:
        fit(model, data, epochs, targs.prune_lr, targs, name)
    finally:
        hook.remove()


def channels_last(model, data):
    """The memory format crl_prune gives its networks on CUDA, so that every row trains alike."""
    return data['numerics'].place(model)


def fit(model, data, epochs, lr, targs, phase):
    """crl_prune's supervised training (SGD, Nesterov, cosine from `lr`) on the training split, with progress lines."""
    batches = crl.Batches(data, 'train', targs.batch_size, train=True)
    progress = crl.Progress(phase, targs.log_every, data['numerics'].device, total_steps=epochs * len(batches))
    return crl.train(model, batches, epochs, lr, weight_decay=targs.wd, bf16=data['numerics'].bf16,
                     wrap=torch.compile if targs.compile else None, phase=phase, callback=progress)


def baseline(method, crl_widths, dense_path, data, fraction, seed, args, targs):
    """Prune (or build) and train one baseline row's network; returns it, its accuracy before the final training
    phase (None for a network trained from scratch) and the seconds spent before that phase."""
    torch.manual_seed(seed)
    device = data['numerics'].device
    dense = channels_last(crl.load_pruned(dense_path, device=device)[0].train(), data)
    e = epochs(method, args.dense_epochs, args.prune_epochs, args.finetune_epochs)
    t0 = time.time()
    if method.endswith('scratch'):
        widths = crl_widths if method == 'scratch' else uniform_widths(dense, fraction)
        model = channels_last(crl.build(dense.arch, widths, dense.num_classes).to(device), data)
        fit(model, data, e['scratch'], targs.lr, targs, method)
        return model, None, 0.0
    if method.startswith('crl-widths'):
        model = crl.compact(dense, channel_masks(dense, crl_widths, method.split('-')[-1], seed))
    else:
        model = dense
        p = pruner(model, method, args.tp_reg if method == 'tp-group-reg' else args.slim_reg, steps=200,
                   size=data['size'])
        if e['sparsity']:  # Torch-Pruning's reproduction trains its sparsity phase without weight decay
            sargs = argparse.Namespace(**{**vars(targs), 'wd': 0.0 if method == 'tp-group-reg' else targs.wd})
            sparsity_learning(model, p, data, e['sparsity'], sargs, f'{method}-sparsity')
        prune_to(model, p, fraction)
    prune_s = time.time() - t0
    model = channels_last(model, data)
    crl.recalibrate_bn(model, crl.Batches(data, 'train', targs.batch_size, train=True))  # as crl_prune does
    before = crl.evaluate(model, data)
    try:
        fit(model, data, e['finetune'], targs.lr, targs, method)
    except crl.CRLError as error:  # the row's network diverged: recorded as such, the other rows still run
        print(f"{method}: {error}", flush=True)
        model.diverged = str(error)
    return model, before, prune_s


def parameter_budget(budget):
    """A --budgets item for the rows that prune or size a network themselves: {'params': (number, unit)}."""
    parsed = crl.parse_budget(budget)
    if list(parsed) != ['params']:
        sys.exit(f"compare.py: --budgets {budget}: the baseline rows prune to a parameter budget alone "
                 f"(params=FRACTION or params=COUNT); keep other budgets to --methods crl or its --crl-args")
    return parsed


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
                          'diverged': sum('diverged' in r for r in rs),
                          'accuracy_mean': statistics.mean(acc), 'accuracy_std': statistics.pstdev(acc),
                          'params_fraction': statistics.mean(r['params_fraction'] for r in rs),
                          'macs_fraction': statistics.mean(r['macs_fraction'] for r in rs),
                          'params': rs[0]['params'], 'prune_s': statistics.mean(r['prune_s'] for r in rs),
                          'epochs': rs[0].get('epochs')})
    return table


def markdown(table, dense):
    lines = [f"dense: {dense['params']:,} params, {dense['macs']:,} MACs, accuracy {100 * dense['accuracy']:.2f}%", '',
             '| budget | method | epochs dense+sparsity+prune+finetune | epochs from scratch | params (fraction) | '
             'MACs fraction | accuracy % (mean ± std) | seeds | pruning s |', '|---|---|---|---|---|---|---|---|---|']
    for t in table:
        e = t['epochs'] or dict.fromkeys(['dense', 'sparsity', 'prune', 'finetune', 'scratch'], '?')
        lines.append(f"| {t['budget']} | {t['method']} | {e['dense']}+{e['sparsity']}+{e['prune']}+{e['finetune']} | "
                     f"{e['scratch']} | {t['params']:,} ({t['params_fraction']:.3f}) | {t['macs_fraction']:.3f} | "
                     f"{100 * t['accuracy_mean']:.2f} ± {100 * t['accuracy_std']:.2f}"
                     f"{f' ({d} diverged)' if (d := t.get('diverged')) else ''} | {t['seeds']} | "
                     f"{t['prune_s']:.1f} |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='vgg16')
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--data', required=True, help='ImageFolder directory with train/ and test/')
    p.add_argument('--subset', type=int, default=0)
    p.add_argument('--image-size', type=int, help="crl_prune.py's --image-size (default: the data's own)")
    p.add_argument('--budgets', nargs='+', default=['params=0.1'])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--methods', nargs='+', default=METHODS, choices=METHODS)
    p.add_argument('--dense-epochs', type=int, default=30)
    p.add_argument('--prune-epochs', type=int, default=10)
    p.add_argument('--finetune-epochs', type=int, default=20)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, help="crl_prune.py's --lr (dense training, fine-tuning, from scratch) for every "
                   'row (default: its own)')
    p.add_argument('--pretrained', help='dense checkpoint to start from (default: train one into OUT/dense)')
    p.add_argument('--crl-args', default='', help='extra crl_prune.py arguments for the CRL rows')
    p.add_argument('--crl-name', default='crl', help="label of the CRL rows (a variant's, with --crl-args); the "
                   "scratch and crl-widths rows use its widths and are labelled METHOD:NAME unless NAME is crl")
    p.add_argument('--tp-reg', type=float, default=5e-4, help='sparsity regularisation of tp-group-reg (Torch-Pruning '
                   "reproduce/main.py's default)")
    p.add_argument('--slim-reg', type=float, default=1e-4, help="L1 penalty on the BN scales of slimming (the paper's "
                   'value for VGG on CIFAR)')
    p.add_argument('--device', default='auto')
    p.add_argument('--out', default='bench/out')
    args = p.parse_args(argv)
    common = ['--arch', args.arch, '--width', str(args.width), '--data', args.data, '--subset', str(args.subset),
              '--batch-size', str(args.batch_size), '--device', args.device, '--log-every', '1000000',
              *(['--image-size', str(args.image_size)] if args.image_size else []),
              *(['--lr', str(args.lr)] if args.lr else [])]

    budgeted = [m for m in args.methods if m != 'crl' and m not in FROM_CRL]  # rows that meet the budget themselves
    for budget in args.budgets:  # a bad budget stops here, before any training
        parameter_budget(budget) if budgeted else crl.parse_budget(budget)

    dense_path = args.pretrained or os.path.join(args.out, 'dense', 'dense.pt')
    if not os.path.exists(dense_path):  # a short CRL run trains and saves the dense checkpoint (--overwrite: a run
        # stopped before it saved dense.pt left no more than its metrics.csv there)
        crl.main([*common, '--dense-epochs', str(args.dense_epochs), '--prune-epochs', '1', '--finetune-epochs', '0',
                  '--overwrite', '--out', os.path.join(args.out, 'dense')])
    targs = crl.parse_args([*common, '--pretrained', dense_path])
    device = crl.get_device(args.device, '--device')
    shape = (3, targs.image_size, targs.image_size)  # the dense checkpoint's
    data = crl.load_data(targs, crl.Numerics(device, targs.bf16, targs.channels_last), shape[-1])
    ckpt = torch.load(dense_path, map_location='cpu', weights_only=True)
    data.update({k: torch.tensor(ckpt[k]) for k in ('mean', 'std') if k in ckpt})  # its inputs, as CRL's rows see them
    dense_model, dense_info = crl.load_pruned(dense_path, device=device)
    names = dense_info['group_names']
    dp, dm = crl.count(dense_model, shape)
    dense = {'params': dp, 'macs': dm, 'accuracy': crl.evaluate(dense_model, data)}
    print(f"dense checkpoint {dense_path}: {dense}", flush=True)

    def label(method):
        if method == 'crl':
            return args.crl_name
        return f"{method}:{args.crl_name}" if method in FROM_CRL and args.crl_name != 'crl' else method

    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, 'rows.json')
    rows = json.load(open(rows_path)) if os.path.exists(rows_path) else []
    for budget in args.budgets:
        fraction = crl.resolve_budget(parameter_budget(budget), {'params': dp})['params'] if budgeted else None
        for seed in args.seeds:
            for method in [m for m in METHODS if m in args.methods]:  # crl first: other rows use its widths
                done = {(r['budget'], r['method'], r['seed']): r for r in rows}
                if (budget, label(method), seed) in done:
                    continue
                if method == 'crl':
                    r = crl.main([*common, '--pretrained', dense_path, '--budget', budget, '--seed', str(seed),
                                  '--prune-epochs', str(args.prune_epochs), '--finetune-epochs',
                                  str(args.finetune_epochs), '--overwrite', '--out',
                                  os.path.join(args.out, f"{args.crl_name}-{budget.replace('=', '')}-s{seed}"),
                                  *args.crl_args.split()])
                    params, macs, acc, prune_s = (r['pruned']['params'], r['pruned']['macs'], r['pruned']['accuracy'],
                                                  r['time_s']['prune'])
                    a = r['args']
                    extra = {'accuracy_before_finetune': r['pruned']['accuracy_before_finetune'],
                             'channels': r['channels'], 'epochs': {
                                 'dense': args.dense_epochs, 'sparsity': 0, 'prune': a['prune_epochs'],
                                 'finetune': 0 if a['reinit'] else a['finetune_epochs'],
                                 'scratch': a['finetune_epochs'] if a['reinit'] else 0}}
                else:
                    source = done.get((budget, args.crl_name, seed))
                    if method in FROM_CRL and source is None:
                        sys.exit(f"compare.py: {method} takes the widths of the {args.crl_name} row of {budget}, "
                                 f"seed {seed}: add crl to --methods")
                    widths = list(source['channels'].values()) if method in FROM_CRL else None
                    model, before, prune_s = baseline(method, widths, dense_path, data, fraction, seed, args, targs)
                    params, macs = crl.count(model, shape)
                    acc = crl.evaluate(model, data)  # a diverged network's too: what it computes
                    extra = {'accuracy_before_finetune': before,
                             'channels': dict(zip(names, kept_widths(model, None if crl.units(model) else names))),
                             'epochs': epochs(method, args.dense_epochs, args.prune_epochs, args.finetune_epochs),
                             **({'diverged': model.diverged} if hasattr(model, 'diverged') else {})}
                row = {'budget': budget, 'method': label(method), 'seed': seed, 'params': params, 'macs': macs,
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
    return rows


if __name__ == '__main__':
    main()
