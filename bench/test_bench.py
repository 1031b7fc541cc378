"""Tests of the bench scripts (bench/compare.py, bench/plot.py, bench/loaders.py), on the CPU, on small data the tests
make. Those of compare.py and plot.py need bench/requirements.txt (torch-pruning, matplotlib) and skip, with the
reason, without it."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import crl_prune as crl  # noqa: E402
from test_crl_prune import PNG, TINY, signal_data, write_image_folder  # noqa: E402

BENCH_REQUIREMENTS = 'pip install -r bench/requirements.txt'


@pytest.fixture
def tiny(tmp_path):
    return write_image_folder(tmp_path / 'data')


@pytest.fixture(scope='module')
def logged_run(tmp_path_factory):
    """One tiny run with two constraints: its folder (what bench/plot.py draws)."""
    root = tmp_path_factory.mktemp('logged')
    out = root / 'out'
    crl.main([*TINY, '--data', write_image_folder(root / 'data'), '--out', str(out), '--budget', 'params=0.3,macs=0.5'])
    return out, None, None


# --- bench/compare.py: the baselines ---------------------------------------------------------------------------------

@pytest.fixture
def compare(monkeypatch):
    pytest.importorskip('torch_pruning', reason=f'bench/compare.py needs torch-pruning ({BENCH_REQUIREMENTS})')
    monkeypatch.syspath_prepend(HERE)
    import compare
    return compare


BENCH = ['--arch', 'vgg11', '--width', '0.0625', '--seeds', '0', '--dense-epochs', '1', '--prune-epochs', '1',
         '--finetune-epochs', '2', '--batch-size', '16', '--budgets', 'params=0.3']


def spy_on_training(monkeypatch, compare):
    """Every crl.train call: its phase, epochs, lr, weight decay, input statistics, the kept widths of the network and
    whether the network is freshly initialised; and the channel choice (l1, random) of every crl-widths row."""
    calls, train, masks = [], crl.train, compare.channel_masks

    def spy(model, batches, epochs, lr=0.1, **kw):
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        calls.append({'phase': kw.get('phase'), 'epochs': epochs, 'lr': lr, 'wd': kw.get('weight_decay'),
                      'mean': batches.data['mean'].tolist(), 'widths': compare.kept_widths(model),
                      'fresh': all(bool((m.weight == 1).all() and (m.running_mean == 0).all()) for m in bns)})
        return train(model, batches, epochs, lr, **kw)
    monkeypatch.setattr(crl, 'train', spy)
    monkeypatch.setattr(compare, 'channel_masks', lambda model, widths, how, seed: calls.append({'choice': how}) or
                        masks(model, widths, how, seed))
    return calls


def test_bench_rows_at_equal_training(tmp_path, tiny, compare, monkeypatch):
    """The scratch and crl-widths rows take the CRL row's widths; the scratch rows train fresh networks, the others
    networks cut from the dense checkpoint (by L1 norm or at random); every row trains dense 1 + prune 1 + finetune
    2 = 4 epochs in all, as its record says. A CRL variant (--crl-name) adds its own rows and reruns none."""
    calls = spy_on_training(monkeypatch, compare)
    argv = ['--data', tiny, *BENCH, '--out', str(tmp_path / 'bench')]
    methods = ['crl', 'scratch', 'uniform-scratch', 'crl-widths-l1', 'crl-widths-random']
    rows = {r['method']: r for r in compare.main([*argv, '--methods', *methods])}
    assert set(rows) == set(methods)
    assert rows['crl']['epochs'] == {'dense': 1, 'sparsity': 0, 'prune': 1, 'finetune': 2, 'scratch': 0}
    crl_widths = list(rows['crl']['channels'].values())
    for method in methods[1:]:
        r = rows[method]
        trained = [c for c in calls if c.get('phase') == method]
        assert sum(c['epochs'] for c in trained) == sum(r['epochs'].values()) - r['epochs']['dense'] > 0
        assert sum(r['epochs'].values()) == 4
        assert all(c['fresh'] == method.endswith('scratch') and c['lr'] == 0.1 for c in trained)
        assert all(c['widths'] == list(r['channels'].values()) for c in trained)
        assert (list(r['channels'].values()) == crl_widths) == (method != 'uniform-scratch')
        assert r['params_fraction'] <= 0.3
    assert rows['scratch']['epochs']['scratch'] == 4 and rows['crl-widths-l1']['epochs']['finetune'] == 3
    assert [c['choice'] for c in calls if 'choice' in c] == ['l1', 'random']

    calls.clear()
    again = compare.main([*argv, '--methods', 'crl', 'scratch', 'uniform-scratch', '--crl-name', 'crl-reinit',
                          '--crl-args=--reinit'])
    new = {r['method']: r for r in again[len(rows):]}
    assert len(again) == len(rows) + 2 and set(new) == {'crl-reinit', 'scratch:crl-reinit'}
    assert new['crl-reinit']['epochs'] == {'dense': 1, 'sparsity': 0, 'prune': 1, 'finetune': 0, 'scratch': 2}
    assert new['scratch:crl-reinit']['channels'] == new['crl-reinit']['channels']
    assert [c['phase'] for c in calls if c.get('phase') in compare.METHODS] == ['scratch']  # uniform-scratch: done


def test_bench_rows_see_the_inputs_of_the_pretrained_checkpoint(tmp_path, tiny, compare, monkeypatch):
    """Baselines normalise their inputs with the statistics of the dense checkpoint, as crl_prune --pretrained does."""
    calls = spy_on_training(monkeypatch, compare)
    path = str(tmp_path / 'dense.pt')
    crl.save_pruned(crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 3), path, torch.tensor([0.25, 0.5, 0.75]),
                   torch.tensor([0.5, 0.5, 0.5]))
    compare.main(['--data', tiny, *BENCH, '--out', str(tmp_path / 'bench'), '--pretrained', path,
                  '--methods', 'uniform-scratch'])
    assert [c['mean'] for c in calls] == [[0.25, 0.5, 0.75]]


def test_bench_row_that_diverges_is_recorded_and_the_rest_run(tmp_path, tiny, compare, monkeypatch, capsys):
    """A baseline whose fine-tuning diverges is a row marked `diverged` (the table counts it), not a stopped run."""
    train = crl.train

    def diverging(model, batches, epochs, lr=0.1, **kw):
        if kw.get('phase') == 'l1-uniform':
            raise crl.CRLError('l1-uniform epoch 1 step 1: the loss became nan')
        return train(model, batches, epochs, lr, **kw)
    monkeypatch.setattr(crl, 'train', diverging)
    rows = compare.main(['--data', tiny, *BENCH, '--out', str(tmp_path / 'bench'),
                         '--methods', 'l1-uniform', 'random-uniform'])
    assert [(r['method'], 'diverged' in r) for r in rows] == [('l1-uniform', True), ('random-uniform', False)]
    assert 'nan' in rows[0]['diverged'] and 0 <= rows[0]['accuracy'] <= 1
    table = {t['method']: t for t in compare.summary(rows)}
    assert table['l1-uniform']['diverged'] == 1 and table['random-uniform']['diverged'] == 0
    assert '(1 diverged)' in capsys.readouterr().out


def test_bench_channel_choice_and_uniform_widths(compare):
    torch.manual_seed(0)
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 10)
    widths = [max(1, w // 3) for w in crl.group_widths(model)]
    l1 = compare.channel_masks(model, widths, 'l1', 0)
    for u in crl.units(model)[:-1]:  # VGG: one layer produces each group
        norms, kept = u.layer.weight.detach().flatten(1).abs().sum(1), l1[u.out].bool()
        assert kept.sum() == widths[u.out] and norms[kept].min() >= norms[~kept].max()
    random = [compare.channel_masks(model, widths, 'random', seed) for seed in (0, 1)]
    assert [m.sum().item() for m in random[0]] == widths
    assert any(not torch.equal(a, b) for a, b in zip(*random))
    assert any(not torch.equal(a, b) for a, b in zip(random[0], l1))
    dense, d = crl.count(model)[0], torch.tensor(crl.group_widths(model))
    for fraction in (0.1, 0.3):
        w = torch.tensor(compare.uniform_widths(model, fraction))
        r = (w / d).median()
        assert ((d * r).round() - w).abs().max() <= 1  # one ratio for every group, up to rounding
        assert fraction - 0.03 < crl.count(crl.build('vgg11', w.tolist(), 10))[0] / dense <= fraction


@pytest.mark.parametrize('method, pruner, normalizer', [('tp-group-reg', 'GroupNormPruner', 'max'),
                                                        ('slimming', 'BNScalePruner', None)])
def test_bench_sparsity_learning_shrinks_the_bn_scales(compare, method, pruner, normalizer):
    """Configured as documented (global pruning, the normaliser), and the pruner's regulariser is applied at every
    step of the sparsity-learning phase."""
    tp = pytest.importorskip('torch_pruning')
    args = crl.parse_args(['--batch-size', '32', '--prune-lr', '0.01', '--log-every', '1000000'])
    scales = []
    for reg in (0.0, 1.0):
        torch.manual_seed(0)
        model = crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 2)
        p = compare.pruner(model, method, reg, steps=10)
        assert type(p) is getattr(tp.pruner, pruner) and p.global_pruning and p.importance.normalizer == normalizer
        compare.sparsity_learning(model, p, signal_data(128), 2, args, method)
        scales.append(sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d)).item())
    assert scales[1] < 0.9 * scales[0], scales


def test_bench_sparsity_learning_rows(tmp_path, tiny, compare, monkeypatch):
    """Sparsity learning for the pruning epochs at the weights' pruning lr (without weight decay for tp-group-reg,
    as Torch-Pruning's reproduction trains), then fine-tuning; a criterion without it fine-tunes for both."""
    pytest.importorskip('torch_pruning')
    calls = spy_on_training(monkeypatch, compare)
    methods = ['tp-group-reg', 'slimming', 'l1-uniform']
    rows = compare.main(['--data', tiny, *BENCH, '--out', str(tmp_path / 'bench'), '--methods', *methods])
    assert [r['method'] for r in rows] == methods
    for r in rows:
        assert r['params_fraction'] <= 0.3 and sum(r['epochs'].values()) == 4
        sparsity = 1 if r['method'] != 'l1-uniform' else 0
        assert r['epochs'] == {'dense': 1, 'sparsity': sparsity, 'prune': 0, 'finetune': 3 - sparsity, 'scratch': 0}
        trained = {c['phase']: (c['epochs'], c['lr'], c['wd']) for c in calls if c['phase'].startswith(r['method'])}
        expected = {r['method']: (3 - sparsity, 0.1, 5e-4)}
        if sparsity:
            expected[f"{r['method']}-sparsity"] = (1, 0.02, 0.0 if r['method'] == 'tp-group-reg' else 5e-4)
        assert trained == expected


def test_bench_refuses_what_it_cannot_run(tmp_path, tiny, compare):
    argv = ['--data', tiny, *BENCH, '--out', str(tmp_path / 'bench')]
    with pytest.raises(SystemExit, match='parameter budget alone'):
        compare.main([*argv, '--budgets', 'params=0.3,macs=0.5', '--methods', 'crl', 'uniform-scratch'])
    assert not (tmp_path / 'bench').exists()  # before any training
    with pytest.raises(SystemExit, match='add crl to --methods'):
        compare.main([*argv, '--methods', 'scratch'])



# --- bench/plot.py: the figures ----------------------------------------------------------------------------------

def test_plot_script_draws_every_figure(logged_run, tmp_path):
    pytest.importorskip('matplotlib', reason=f'matplotlib is not installed ({BENCH_REQUIREMENTS})')
    out, _, _ = logged_run
    compare = os.path.join(HERE, 'results', 'cpu_vgg16_w0.25.json')
    command = [sys.executable, os.path.join(HERE, 'plot.py'), str(out), '--compare', compare,
               '--out', str(tmp_path / 'figures')]
    r = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    figures = {'dual.png', 'channels.png', 'keep.png', 'compare.png'}
    assert set(os.listdir(tmp_path / 'figures')) == figures
    for name in figures:
        data = (tmp_path / 'figures' / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)  # figures are not silently replaced
    assert again.returncode != 0 and 'pass --overwrite' in again.stderr and again.stderr.count('\n') == 1


def test_plot_script_reads_every_compare_format(tmp_path):
    pytest.importorskip('matplotlib', reason=f'matplotlib is not installed ({BENCH_REQUIREMENTS})')
    sys.path.insert(0, HERE)
    try:
        import plot
    finally:
        sys.path.remove(HERE)
    results = json.loads(open(os.path.join(HERE, 'results', 'cpu_vgg16_w0.25.json')).read())
    formats = {'rows.json': results['rows'], 'summary.json': {k: results[k] for k in ('dense', 'args', 'table')}}
    for name, content in formats.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert plot.main(['--compare', str(tmp_path / name), '--out', str(tmp_path / name[:-5])]) == ['compare.png']
        assert (tmp_path / name[:-5] / 'compare.png').read_bytes().startswith(PNG)
    (tmp_path / 'other.json').write_text(json.dumps({'rows': [{'variant': 'x'}]}))
    with pytest.raises(SystemExit, match='not bench/compare.py results'):
        plot.main(['--compare', str(tmp_path / 'other.json'), '--out', str(tmp_path / 'none')])
    assert not (tmp_path / 'none').exists()


# --- bench/loaders.py: the two data paths --------------------------------------------------------------------------

def test_loaders_script_times_both_paths(tmp_path, capsys):
    sys.path.insert(0, HERE)
    import loaders
    root = write_image_folder(tmp_path / 'data', size=48)
    loaders.main(['--data', root, '--workers', '0', '--batch-size', '12', '--passes', '1', '--width', '0.0625'])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert [line.split(' | ')[:3] for line in lines[1:]] == [['| memory', '48', '36'], ['| stream', '48', '36']]
    assert all(float(line.split(' | ')[4].replace(',', '')) > 0 for line in lines[1:])
