"""Figures of a crl_prune.py run folder and of bench/compare.py results.

    pip install -r bench/requirements.txt
    python bench/plot.py runs/vgg16-params0.1 --out figures
    python bench/plot.py --compare bench/results/cpu_vgg16_w0.25.json --out figures

From a run folder (its results.json, metrics.csv and policy.pt):
  dual.png       the dual dynamics over the pruning steps: expected cost against the budget and the multiplier of
                 every constraint, and how the keep-probabilities separate (mean, fractions below 0.1 and above 0.9)
  channels.png   kept channels of every layer (group of channels) against the dense widths
  keep.png       histogram of the keep-probabilities of every layer at the end of pruning, kept channels apart
From bench/compare.py results (its rows.json or summary.json, or a bench/results/*.json holding either):
  compare.png    test accuracy against the fraction of parameters kept, every method, mean and spread over seeds
An existing figure is replaced only with --overwrite.
"""
import argparse
import csv
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import summary  # noqa: E402

try:
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ImportError:
    plt = None


def fail(message):
    raise SystemExit(f"plot.py: error: {message}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read it as JSON ({type(e).__name__})")


def pruning_rows(run):
    """The progress rows of the pruning phase in metrics.csv, numbers as floats (empty cells are left out)."""
    with open(os.path.join(run, 'metrics.csv'), newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['phase'] == 'prune' and not r['test_accuracy']]
    return [{k: float(v) for k, v in r.items() if v and k != 'phase'} for r in rows]


def title(results):
    budget = ', '.join(f"{k}={v:g}" for k, v in results['budget'].items())
    return f"{results['arch']} width {results['width']:g}, budget {budget}"


def plot_dual(run, results, path):
    rows = pruning_rows(run)
    names = list(results['budget'])
    fig = plt.figure(figsize=(4.5 * len(names) + 1, 8), layout='constrained')
    grid = fig.add_gridspec(3, len(names))
    step = [r['step'] for r in rows]
    style = {'marker': 'o', 'markersize': 3} if len(rows) < 40 else {}
    for j, name in enumerate(names):
        cost = fig.add_subplot(grid[0, j])
        cost.plot(step, [r[f'cost_{name}'] for r in rows], label='expected cost (mean of the sampled masks)', **style)
        cost.axhline(results['budget'][name], color='k', linestyle='--', label=f"budget {results['budget'][name]:g}")
        cost.set(title=name, ylabel=f'{name}, fraction of dense', ylim=(0, None))
        cost.legend(fontsize='small')
        cost.xaxis.set_major_locator(MaxNLocator(integer=True))
        lam = fig.add_subplot(grid[1, j], sharex=cost)
        lam.plot(step, [r[f'lambda_{name}'] for r in rows], color='tab:red', **style)
        lam.set(ylabel=f'multiplier lambda ({name})', ylim=(0, None))
    keep = fig.add_subplot(grid[2, :])
    for column, label in (('keep_mean', 'mean keep-probability'), ('keep_below_0.1', 'fraction of channels p < 0.1'),
                          ('keep_above_0.9', 'fraction of channels p > 0.9')):
        keep.plot(step, [r[column] for r in rows], label=label, **style)
    keep.set(xlabel='pruning step', ylabel='keep-probabilities', ylim=(0, 1))
    keep.legend(fontsize='small')
    keep.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title(results)}:\ndual dynamics while pruning")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_channels(run, results, path):
    names, kept = list(results['channels']), list(results['channels'].values())
    dense = [results['dense_channels'][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) + 2), 4.5), layout='constrained')
    x = range(len(names))
    ax.bar(x, dense, color='lightgray', label='dense')
    ax.bar(x, kept, color='tab:blue', label='kept')
    for i, k in enumerate(kept):
        ax.annotate(str(k), (i, k), ha='center', va='bottom', fontsize='x-small')
    long = max(map(len, names)) > 6  # ResNet18's block1.conv1 ...: slanted
    ax.set_xticks(list(x), names, rotation=40 if long else 0, ha='right' if long else 'center')
    ax.set(ylabel='channels', xlabel='layer (group of channels removed together)')
    ax.legend()
    p = results['pruned']
    ax.set_title(f"{title(results)}\nkept channels: {p['params_fraction']:.3f} of the parameters, "
                 f"{p['macs_fraction']:.3f} of the MACs", fontsize='medium')
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_keep(run, results, path):
    theta = torch.load(os.path.join(run, 'policy.pt'), map_location='cpu', weights_only=True)['theta']
    cols = min(5, len(theta))
    rows = math.ceil(len(theta) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.8), sharex=True, squeeze=False,
                             layout='constrained')
    bins = [i / 20 for i in range(21)]
    for ax, (name, t) in zip(axes.flat, theta.items()):
        p = torch.sigmoid(t.double())
        order = t.argsort(descending=True)  # the final mask keeps the most probable channels of every group
        k = results['channels'][name]
        ax.hist([p[order[:k]].tolist(), p[order[k:]].tolist()], bins=bins, stacked=True,
                color=['tab:blue', 'lightgray'], label=['kept', 'removed'])
        ax.set_title(f"{name}: {k} of {len(t)} kept", fontsize='small')
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(theta):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel('channels')
    for i, ax in enumerate(axes.flat[:len(theta)]):
        if i + cols >= len(theta):  # the lowest panel of its column
            ax.set_xlabel('keep-probability')
            ax.tick_params(labelbottom=True)
    axes.flat[0].legend(fontsize='small')
    fig.suptitle(f"{title(results)}: keep-probabilities at the end of pruning")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_table(data, path):
    """bench/compare.py's rows (rows.json, or 'rows' of a results file) or its table (summary.json) -> (table,
    rows): table entries as compare.summary makes them, rows the single runs (empty where only the table is)."""
    rows = data if isinstance(data, list) else data.get('rows', []) if isinstance(data, dict) else []
    table = [] if rows or not isinstance(data, dict) else data.get('table', [])
    row_keys = {'budget', 'method', 'seed', 'accuracy', 'params_fraction', 'macs_fraction', 'params', 'prune_s'}
    table_keys = {'budget', 'method', 'seeds', 'accuracy_mean', 'accuracy_std', 'params_fraction'}
    if not (rows or table) or not all(isinstance(r, dict) and row_keys <= set(r) for r in rows) \
            or not all(isinstance(t, dict) and table_keys <= set(t) for t in table):
        fail(f"{path}: not bench/compare.py results (rows.json, summary.json or a file with 'rows' or 'table')")
    return (summary(rows) if rows else table), rows


def series(entry):
    """Rows of one method and one kind of budget form a line: 'crl', or 'crl, also macs=0.102' for CRL runs given a
    second budget beside the parameter budget."""
    extra = ','.join(entry['budget'].split(',')[1:])
    return f"{entry['method']}, also {extra}" if extra else entry['method']


def plot_compare(data, source, path):
    table, rows = compare_table(data, source)
    fig, ax = plt.subplots(figsize=(7.5, 5), layout='constrained')
    for name in dict.fromkeys(map(series, table)):
        points = sorted((t for t in table if series(t) == name), key=lambda t: t['params_fraction'])
        crl = name.startswith('crl')
        line = ax.errorbar([t['params_fraction'] for t in points], [100 * t['accuracy_mean'] for t in points],
                           yerr=[100 * t['accuracy_std'] for t in points], marker='o', capsize=4,
                           linewidth=2.2 if crl else 1.2, zorder=3 if crl else 2, label=name)
        single = [r for r in rows if series(r) == name]
        ax.scatter([r['params_fraction'] for r in single], [100 * r['accuracy'] for r in single], s=10,
                   color=line[0].get_color(), alpha=0.4, zorder=1)
    if isinstance(data, dict) and 'dense' in data:
        dense = 100 * data['dense']['accuracy']
        ax.axhline(dense, color='k', linestyle='--', label=f'dense network ({dense:.2f}%)')
    seeds = sorted({t['seeds'] for t in table})
    setting = data.get('args', {}) if isinstance(data, dict) else {}
    network = f"{setting['arch']} width {setting['width']:g}: " if {'arch', 'width'} <= set(setting) else ''
    ax.set(xlabel='parameters kept (fraction of the dense network)', ylabel='test accuracy (%)',
           title=f"{network}accuracy against parameters kept\nmean ± standard deviation over "
                 f"{' or '.join(map(str, seeds))} seeds (dots: single seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    fig.savefig(path, dpi=110)
    plt.close(fig)


RUN_FIGURES = [('dual.png', 'metrics.csv', plot_dual), ('channels.png', 'results.json', plot_channels),
               ('keep.png', 'policy.pt', plot_keep)]  # name, the file of the run it is drawn from, how


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('run', nargs='?', help='a crl_prune.py --out folder')
    p.add_argument('--compare', help="bench/compare.py's rows.json or summary.json, or a bench/results/*.json")
    p.add_argument('--out', required=True, help='folder for the PNG files')
    p.add_argument('--overwrite', action='store_true', help='replace figures already in --out')
    args = p.parse_args(argv)
    if plt is None:
        fail('matplotlib is not installed: pip install -r bench/requirements.txt')
    if not args.run and not args.compare:
        fail('give a run folder, --compare FILE, or both')
    if args.run and not os.path.isfile(os.path.join(args.run, 'results.json')):
        fail(f"{args.run}: no results.json; give the --out folder of a finished crl_prune.py run")
    names = [name for name, _, _ in RUN_FIGURES if args.run] + (['compare.png'] if args.compare else [])
    taken = [name for name in names if os.path.exists(os.path.join(args.out, name))]
    if taken and not args.overwrite:
        fail(f"--out {args.out} already holds {', '.join(taken)}; pass --overwrite to replace them")
    results = read_json(os.path.join(args.run, 'results.json')) if args.run else None
    compare = read_json(args.compare) if args.compare else None
    if compare is not None:
        compare_table(compare, args.compare)  # checked before anything is drawn
    os.makedirs(args.out, exist_ok=True)
    written = []
    for name, needs, plot in RUN_FIGURES if args.run else []:
        if os.path.isfile(os.path.join(args.run, needs)):
            plot(args.run, results, os.path.join(args.out, name))
            written.append(name)
        else:  # a run from before crl_prune.py wrote it
            print(f"{name}: skipped, {args.run} has no {needs}")
    if compare is not None:
        plot_compare(compare, args.compare, os.path.join(args.out, 'compare.png'))
        written.append('compare.png')
    for name in written:
        print(f"wrote {os.path.join(args.out, name)}")
    return written


if __name__ == '__main__':
    main()
