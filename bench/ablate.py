"""Variants of crl_prune's own pipeline side by side: one process, the data decoded once, several seeds.

    python bench/ablate.py --data /tmp/cifar10-jpeg --subset 5000 --width 0.25 --seeds 0 1 2 \
        --common "--dense-epochs 30 --prune-epochs 10 --finetune-epochs 10 --batch-size 64 --budget params=0.1" \
        --variant "default=" --variant "prune-lr 0.05=--prune-lr 0.05" --out bench/out-ablate

Each --variant is NAME=ARGS: crl_prune.py arguments added after --common (a later argument wins). Every run is a
complete crl_prune.main (its own dense training unless ARGS name --pretrained); rows land in OUT/rows.json as they
finish (a rerun skips the rows already there) and the table (mean ± population std over seeds) is printed last.
--module runs another copy of crl_prune.py (for a before/after comparison of a change to the method).
"""
import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys


def load_module(path):
    spec = importlib.util.spec_from_file_location('crl_variant', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True)
    p.add_argument('--subset', type=int, default=0)
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--arch', default='vgg16')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--common', default='', help='crl_prune.py arguments shared by every variant')
    p.add_argument('--variant', action='append', required=True, help='NAME=ARGS (repeatable)')
    p.add_argument('--module', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'crl_prune.py'))
    p.add_argument('--out', default='bench/out-ablate')
    args = p.parse_args()
    crl = load_module(args.module)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, 'rows.json')
    rows = json.load(open(rows_path)) if os.path.exists(rows_path) else []
    done = {(r['variant'], r['seed']) for r in rows}
    variants = [v.partition('=')[::2] for v in args.variant]
    for seed in args.seeds:
        for name, extra in variants:
            if (name, seed) in done:
                continue
            run_out = os.path.join(args.out, f"{name.replace(' ', '_')}-s{seed}")
            r = crl.main(['--arch', args.arch, '--width', str(args.width), '--data', args.data, '--subset',
                          str(args.subset), '--seed', str(seed), '--log-every', '1000000', '--overwrite',
                          '--out', run_out, *shlex.split(args.common), *shlex.split(extra)])
            row = {'variant': name, 'seed': seed, 'accuracy': r['pruned']['accuracy'],
                   'accuracy_before_finetune': r['pruned']['accuracy_before_finetune'],
                   'dense_accuracy': r['dense']['accuracy'], 'params_fraction': r['pruned']['params_fraction'],
                   'macs_fraction': r['pruned']['macs_fraction'], 'channels': list(r['channels'].values()),
                   'time_s': r['time_s'], 'args': extra}
            print(f"ROW {json.dumps(row)}", flush=True)
            rows.append(row)
            with open(rows_path, 'w') as f:
                json.dump(rows, f, indent=1)
    print(f"\n{args.arch} width {args.width}, subset {args.subset}, common: {args.common}\n")
    print('| variant | accuracy % | before fine-tuning % | dense % | params | MACs | seeds |')
    print('|---|---|---|---|---|---|---|')
    for name, _ in variants:
        rs = [r for r in rows if r['variant'] == name]
        if not rs:
            continue
        mean_std = lambda k: (f"{100 * statistics.mean(r[k] for r in rs):.2f} ± "  # noqa: E731
                              f"{100 * statistics.pstdev([r[k] for r in rs]):.2f}")
        print(f"| {name} | {mean_std('accuracy')} | {mean_std('accuracy_before_finetune')} | "
              f"{mean_std('dense_accuracy')} | {statistics.mean(r['params_fraction'] for r in rs):.3f} | "
              f"{statistics.mean(r['macs_fraction'] for r in rs):.3f} | {len(rs)} |")


if __name__ == '__main__':
    sys.exit(main())
