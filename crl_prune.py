"""crl_prune.py: neural network pruning through constrained reinforcement learning, in one file.

Reference implementation of Malik, Haider, Iqbal and Taj, "Neural Network Pruning Through Constrained
Reinforcement Learning", ICPR 2022 (arXiv:2110.08558).

    python crl_prune.py --arch vgg16 --budget params=0.1

The pruning decision is a policy, one Bernoulli keep-probability per channel, p = sigmoid(theta). A mask m drawn
from it selects a sub-network. The policy is trained with REINFORCE to maximise the sub-network's reward R(m)
(minus its cross-entropy) under budgets C_j(m) <= b_j on costs that are only ever *evaluated* (parameters, MACs,
measured latency), enforced by Lagrange multipliers lambda_j >= 0 updated by dual ascent:

    max_theta  min_{lambda >= 0}  E_{m ~ pi_theta} [ R(m) - sum_j lambda_j (C_j(m) - b_j) ]

Meanwhile the weights keep training on the sampled sub-networks. At the end the most probable channels that fit
the budget are kept, the network is physically compacted and fine-tuned.

Sections, in pipeline order:
  1. Models with channel masks      VGG11/13/16/19 and ResNet18 for 32x32 images
  2. Costs as black-box functions   parameters and MACs (exact), measured latency (a per-unit table), any user function
  3. The policy                     one Bernoulli keep-probability per channel
  4. REINFORCE with a baseline      on the Lagrangian reward
  5. The dual step                  projected, damped ascent on the multipliers
  6. The final mask                 the most probable channels within the budget
  7. Physical compaction            the smaller network, same outputs; saving, loading, export
  8. Data and training loops        whole dataset on the device, augmentation as tensor ops; metrics.csv;
                                    checkpoints that --resume continues from
  9. Command line                   checks every input before any long work, then runs the pipeline
"""
import argparse
import copy
import csv
import functools
import glob
import importlib.util
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(message):
    """Every bad input ends here: one line on stderr, exit status 1."""
    raise SystemExit(f"crl_prune: error: {message}")


def first_line(e):
    """An exception as one short line, for the one-line errors."""
    return (str(e).strip().splitlines() or [''])[0][:200]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Models with channel masks
# ---------------------------------------------------------------------------------------------------------------------
# A *group* is a set of channels that are removed together: each channel of a group has one mask entry. Every layer is
# a Unit that knows which group its output channels (`out`) and its input channels (`inp`) belong to; None means the
# image or the class scores, which are never pruned. That one fact drives masking here, counting (section 2) and
# compaction (section 7): dim 0 of every tensor of a unit follows its `out` group, dim 1 its `inp` group.
# Channels that a residual addition sums must vanish together, so they share one group.
# Masks come as one (K, width) tensor per group: the batch is K equal slices, slice k runs sub-network k. In training,
# BatchNorm takes its statistics over each slice separately, so a sub-network's outputs (and its reward) depend on its
# own mask and images only, never on the other masks of the batch, and match what the compact network computes.

def batch_norm_per_slice(bn, y, k):
    """Train-mode BN of `y` = K slices of n samples, each slice normalised with its own mean and variance over its n
    samples (and positions). The running statistics move towards the mean of the K slices' statistics."""
    z = y.float().view(k, -1, *y.shape[1:])  # (K, n, C, ...): a view, whatever the memory format
    dims = [1, *range(3, z.dim())]
    var, mean = torch.var_mean(z, dims, correction=0, keepdim=True)
    if bn.track_running_stats:
        with torch.no_grad():
            n = z.numel() // (k * z.shape[2])  # values behind each slice's statistics
            bn.running_mean.lerp_(mean.mean(0).flatten(), bn.momentum)
            bn.running_var.lerp_(var.mean(0).flatten() * n / max(n - 1, 1), bn.momentum)
            bn.num_batches_tracked += 1
    shape = (1, 1, -1) + (1,) * (z.dim() - 3)
    return ((z - mean) * torch.rsqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)).flatten(0, 1)


class Unit(nn.Module):
    """conv or linear layer -> BN, then the mask of group `out`: a masked channel outputs exactly zero."""

    def __init__(self, layer, bn, inp, out):
        super().__init__()
        self.layer, self.bn, self.inp, self.out = layer, bn, inp, out

    def forward(self, x, masks=None):
        y = self.layer(x)
        k = 1 if masks is None else len(masks[0])
        per_slice = k > 1 and self.training and isinstance(self.bn, nn.modules.batchnorm._BatchNorm)
        y = batch_norm_per_slice(self.bn, y, k) if per_slice else self.bn(y)
        if masks is None or self.out is None:
            return y
        m = masks[self.out]  # (K, channels): slice k of the batch keeps the channels of mask k
        return (y.view(k, -1, *y.shape[1:]) * m.view(k, 1, -1, *[1] * (y.dim() - 2)).to(y.dtype)).flatten(0, 1)

    def dim_groups(self, t):
        """(dim, group) pairs of one of this unit's tensors: dim 0 follows the output group, dim 1 the input group."""
        return [(d, g) for d, g in ((0, self.out), (1, self.inp)) if d < t.dim() and g is not None]


def conv_bn(widths, inp, out, stride=1, k=3):
    cin = 3 if inp is None else widths[inp]
    return Unit(nn.Conv2d(cin, widths[out], k, stride, k // 2, bias=False), nn.BatchNorm2d(widths[out]), inp, out)


VGG_CFG = {  # channels per conv layer; 'M' is a 2x2 max-pool
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'vgg19': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M'],
}
ARCHS = [*VGG_CFG, 'resnet18']


class VGG(nn.Module):
    """CIFAR VGG of Li et al. (2017) and HRank: conv3x3-BN-ReLU stacks, then Linear(512,512)-BN1d-ReLU-Linear.
    Groups: one per conv layer, then one for the hidden linear layer."""

    def __init__(self, arch, widths, num_classes):
        super().__init__()
        cfg = VGG_CFG[arch]
        convs = [c for c in cfg if c != 'M']
        self.group_names = [f'conv{i + 1}' for i in range(len(convs))] + ['fc1']
        self.convs = nn.ModuleList(conv_bn(widths, g - 1 if g else None, g) for g in range(len(convs)))
        self.pool_after = {len([c for c in cfg[:i] if c != 'M']) - 1 for i, c in enumerate(cfg) if c == 'M'}
        last, hidden = len(convs) - 1, len(convs)
        self.fc1 = Unit(nn.Linear(widths[last], widths[hidden], bias=False), nn.BatchNorm1d(widths[hidden]),
                        last, hidden)
        self.fc2 = Unit(nn.Linear(widths[hidden], num_classes), nn.Identity(), hidden, None)

    def forward(self, x, masks=None):
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x, masks))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.fc1(x.flatten(1), masks))  # 32x32 input: 1x1 after five pools
        return self.fc2(x, masks)


class Block(nn.Module):
    """ResNet BasicBlock. conv1 has a group of its own; conv2, the shortcut and the block's input are summed, so
    they share the stage's residual-stream group."""

    def __init__(self, widths, inp, mid, out, stride):
        super().__init__()
        self.conv1 = conv_bn(widths, inp, mid, stride)
        self.conv2 = conv_bn(widths, mid, out)
        self.shortcut = conv_bn(widths, inp, out, stride, k=1) if stride != 1 or inp != out else None

    def forward(self, x, masks=None):
        h = F.relu(self.conv1(x, masks))
        s = x if self.shortcut is None else self.shortcut(x, masks)
        return F.relu(self.conv2(h, masks) + s)


class ResNet18(nn.Module):
    """CIFAR ResNet18 (3x3 stem, no max-pool). Groups 0-3: the residual stream of each stage (the stem's output is
    stage 1's stream); groups 4-11: the first conv of each block."""

    def __init__(self, arch, widths, num_classes):
        super().__init__()
        self.group_names = [f'stage{s + 1}' for s in range(4)] + [f'block{b + 1}.conv1' for b in range(8)]
        self.stem = conv_bn(widths, None, 0)
        # block b belongs to stage b // 2 and reads the stream of block b - 1's stage (stage 1 for the first block)
        self.blocks = nn.ModuleList(Block(widths, max(b - 1, 0) // 2, 4 + b, b // 2, 2 if b in (2, 4, 6) else 1)
                                    for b in range(8))
        self.fc = Unit(nn.Linear(widths[3], num_classes), nn.Identity(), 3, None)

    def forward(self, x, masks=None):
        x = F.relu(self.stem(x, masks))
        for block in self.blocks:
            x = block(x, masks)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1), masks)


def dense_widths(arch, width=1.0):
    """Channels of every group of the dense network, every layer scaled by `width`."""
    base = [64, 128, 256, 512, 64, 64, 128, 128, 256, 256, 512, 512] if arch == 'resnet18' else \
        [c for c in VGG_CFG[arch] if c != 'M'] + [512]
    return [max(1, round(c * width)) for c in base]


def build(arch, widths, num_classes):
    """The network with `widths` channels per group: dense widths give the dense network, kept widths the compact
    one."""
    model = (ResNet18 if arch == 'resnet18' else VGG)(arch, widths, num_classes)
    model.arch, model.widths, model.num_classes = arch, list(widths), num_classes
    return model


def units(model):
    return [m for m in model.modules() if isinstance(m, Unit)]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Costs as black-box functions of the kept channels
# ---------------------------------------------------------------------------------------------------------------------
# A cost maps the kept widths of K candidate networks, a (K, groups) tensor, to K fractions of the dense network's
# cost. The pruning loop only evaluates costs, never differentiates them, so any function of the kept widths plugs in
# the same way (e.g. latency measured on the compact network). Parameters count every tensor of the compact network,
# BN and classifier included; MACs count conv and linear layers (weight elements x output positions).

@torch.no_grad()
def output_positions(model, kinds):
    """H*W of the output of every module of `kinds` (1 for linear layers), from one forward pass of a 32x32 image."""
    sizes, was_training = {}, model.training
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, o[0, 0].numel()))
             for m in model.modules() if isinstance(m, kinds)]
    model.eval()(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    model.train(was_training)
    return sizes


def measure(model):
    """Parameters and MACs counted on a network itself: the figures reported for the dense and the compact network."""
    macs = sum(m.weight.numel() * n for m, n in output_positions(model, (nn.Conv2d, nn.Linear)).items())
    return sum(p.numel() for p in model.parameters()), macs


def make_costs(model, names):
    """{name: C(widths) -> fraction of the dense `model`} for the requested cost names ('params', 'macs').

    Every tensor of a unit has (its fixed dims) x (kept width of its output group) x (kept width of its input group)
    elements, so both counts are polynomials of degree 2 in the kept widths w: with w' = (1, w),
    count(w) = w'^T M w', one (groups + 1)^2 matrix M per cost, built once here. A step's K candidates then cost one
    einsum, exactly (integers in float64)."""
    g = len(model.widths)
    matrices = {name: torch.zeros(g + 1, g + 1, dtype=torch.float64) for name in COSTS}
    for unit, positions in output_positions(model, Unit).items():
        for name, t in unit.named_parameters():
            groups = dict(unit.dim_groups(t))  # a dim that follows a group has that group's kept width
            fixed = math.prod(size for d, size in enumerate(t.shape) if d not in groups)
            i, j = ([1 + gr for gr in groups.values()] + [0, 0])[:2]  # index 0 of w' is the constant 1
            matrices['params'][i, j] += fixed
            if name == 'layer.weight':  # MACs: weight elements x output positions
                matrices['macs'][i, j] += fixed * positions

    def count(widths, m):  # widths: (..., groups) -> exact count of the network that keeps them
        w = torch.cat([torch.ones_like(widths[..., :1]), widths], -1).to(m)
        return torch.einsum('...i,ij,...j->...', w, m, w)

    def fraction(name):
        m, dense = matrices[name], count(torch.tensor(model.widths), matrices[name]).item()
        on = {}  # a copy of M per device, made once
        return lambda widths: count(widths, on.setdefault(widths.device, m.to(widths.device))) / dense

    return {name: fraction(name) for name in names}


COSTS = ['params', 'macs']
BUILT_IN = COSTS + ['latency']  # cost names a budget may use without --cost


# --- 2b. Measured latency: a per-unit table to predict it during pruning, the compact network timed at the end ----
# Each unit (conv or linear, BN, ReLU) is timed alone on the target device at a small grid of kept (input, output)
# widths; bilinear interpolation fills in every width pair. Units timed alone do not add up to the whole network
# (pools, additions, per-call overheads, caches), so whole networks at ten widths are timed too and the prediction is
# a * (sum over units) + b, fit to them by least squares; a candidate's cost is its prediction over the dense
# network's prediction. A step's K candidates cost one gather over the flattened tables. The prediction only steers
# the policy; the budget is checked by timing the compact network itself, in turns with the dense one (`fit_latency`).

@torch.no_grad()
def time_forward(net, x, run, repeats=20, warmup=3):
    """Seconds of net(x) with the run's precision (`numerics`): warm-up, then the median of `repeats` calls (CUDA
    events on a GPU)."""
    times = []
    for _ in range(warmup + repeats):
        if run['device'].type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with autocast(run):
                net(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            with autocast(run):
                net(x)
            times.append(time.perf_counter() - t)
    return sorted(times[warmup:])[repeats // 2]


def unit_alone(u, cin, cout):
    """What unit `u` computes (layer, BN, ReLU), fresh, at `cin` input and `cout` output channels: timed alone."""
    if isinstance(u.layer, nn.Conv2d):
        c = u.layer
        return nn.Sequential(nn.Conv2d(cin, cout, c.kernel_size, c.stride, c.padding, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())
    bn = nn.BatchNorm1d(cout) if isinstance(u.bn, nn.BatchNorm1d) else nn.Identity()
    return nn.Sequential(nn.Linear(cin, cout), bn)


def latency_device_name(run):
    """The target device as a table records it; on the CPU the thread count matters as much as the chip."""
    d = run['device']
    return torch.cuda.get_device_name(d) if d.type == 'cuda' else f"cpu ({torch.get_num_threads()} threads)"


def image(batch, channels, shape, run):
    """Random input of `shape` (H, W) or () for a linear layer, in the run's memory format, on its device."""
    fmt = torch.channels_last if run['channels_last'] and len(shape) == 2 else torch.contiguous_format
    return torch.randn(batch, channels, *shape, device=run['device']).contiguous(memory_format=fmt)


def latency_meta(model, run, batch):
    """What a latency table depends on: a table is reused only where all of it matches."""
    return {'arch': model.arch, 'widths': list(model.widths), 'num_classes': model.num_classes,
            'device': latency_device_name(run), 'batch': batch, 'bf16': run['bf16'],
            'channels_last': run['channels_last'], 'torch': torch.__version__.split('+')[0]}


@torch.no_grad()
def build_latency_table(model, run, batch, repeats=7):
    """Milliseconds of every unit alone at a grid of (kept input, kept output) widths, and the dense network's own
    measured latency, on `run`'s device, precision and memory format, at `batch` images, in eval mode."""
    model = copy.deepcopy(model).eval().to(run['device'])
    shapes = {}  # unit -> its input's shape without the batch dim
    hooks = [u.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(i[0].shape[2:])))
             for u in units(model)]
    model(torch.zeros(1, 3, 32, 32, device=run['device']))
    for h in hooks:
        h.remove()
    grid = lambda g, fixed: [fixed] if g is None else sorted({1, *(max(1, round(model.widths[g] * f))  # noqa: E731
                                                                  for f in (0.25, 0.5, 0.75, 1))})
    timed, tables = {}, []  # each distinct (module, input shape) is timed once
    for u in units(model):
        gin, gout = grid(u.inp, 3), grid(u.out, model.num_classes)
        ms = torch.zeros(len(gin), len(gout), dtype=torch.float64)
        for a, ci in enumerate(gin):
            for b, co in enumerate(gout):
                net = unit_alone(u, ci, co)
                key = (repr(net), shapes[u])
                if key not in timed:
                    net, x = net.eval().to(run['device']), image(batch, ci, shapes[u], run)
                    if x.dim() == 4 and run['channels_last']:
                        net.to(memory_format=torch.channels_last)
                    timed[key] = 1000 * time_forward(net, x, run, repeats)
                ms[a, b] = timed[key]
        tables.append({'inp': u.inp, 'out': u.out, 'grid_in': gin, 'grid_out': gout, 'ms': ms})
    # Calibration: whole networks at a few widths (uniformly thinned, and random), measured, fit to
    # a * (sum of the units' table values) + b by least squares: b holds pools, additions and per-call overheads.
    table = {'meta': latency_meta(model, run, batch), 'units': tables, 'a': 1.0, 'b': 0.0}
    g = torch.Generator().manual_seed(0)
    dense = torch.tensor(model.widths)
    keep = torch.cat([torch.tensor([[1.0], [0.75], [0.5], [0.25], [0.1]]).expand(5, len(dense)),
                      torch.rand(5, len(dense), generator=g) * 0.9 + 0.1])
    widths = (dense * keep).round().clamp(min=1).long()
    sums = Latency(table).predict_ms(widths)
    measured = torch.tensor(time_in_turns([build(model.arch, w.tolist(), model.num_classes) for w in widths], run,
                                          batch, rounds=3, repeats=repeats), dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([sums, torch.ones_like(sums)], 1), measured[:, None]).solution.flatten()
    return {**table, 'a': a.item(), 'b': b.item(), 'dense_ms': measured[0].item()}


def interpolation(grid, n):
    """(n + 1, len(grid)) weights: row c interpolates (linearly, extrapolating at the ends) grid values at width c."""
    if len(grid) == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g, c = torch.tensor(grid, dtype=torch.float64), torch.arange(n + 1, dtype=torch.float64)
    j = (torch.searchsorted(g, c, right=True) - 1).clamp(0, len(g) - 2)
    t = (c - g[j]) / (g[j + 1] - g[j])
    m = torch.zeros(n + 1, len(g), dtype=torch.float64)
    m[torch.arange(n + 1), j], m[torch.arange(n + 1), j + 1] = 1 - t, t
    return m


class Latency:
    """The latency cost: C(widths) = predicted latency / predicted dense latency, for K width vectors at once (a
    ratio of two predictions: one noisy timing of the dense network does not shift every fraction)."""

    def __init__(self, table, run=None):  # run: where `measure_*` time networks (`numerics`)
        self.table, self.run, self.dense_ms, g = table, run, table.get('dense_ms'), len(table['meta']['widths'])
        flat, offsets, rows, cols, strides = [], [], [], [], []
        for t in table['units']:  # every unit's table at every integer width pair, flattened one after the other
            full = interpolation(t['grid_in'], t['grid_in'][-1]) @ t['ms'] @ interpolation(t['grid_out'],
                                                                                           t['grid_out'][-1]).T
            offsets.append(sum(f.numel() for f in flat))
            rows.append(g if t['inp'] is None else t['inp'])  # column g of the widths is a constant 0: fixed dims
            cols.append(g if t['out'] is None else t['out'])
            strides.append(full.shape[1])
            flat.append(full.flatten())
        self.flat = torch.cat(flat)
        self.index = [torch.tensor(v) for v in (offsets, rows, cols, strides)]
        self.dense_predicted_ms = self.predict_ms(torch.tensor([table['meta']['widths']])).item()

    def predict_ms(self, widths):
        offsets, rows, cols, strides = (v.to(widths.device) for v in self.index)
        w = torch.cat([widths, torch.zeros_like(widths[..., :1])], -1)
        self.flat = self.flat.to(widths.device)
        return self.flat[offsets + w[..., rows] * strides + w[..., cols]].sum(-1) * self.table['a'] + self.table['b']

    def __call__(self, widths):
        return self.predict_ms(widths) / self.dense_predicted_ms

    def measure_ms(self, *models, rounds=3):
        """Measured milliseconds of whole networks at the table's batch, timed in turns (`time_in_turns`)."""
        return time_in_turns(models, self.run, self.table['meta']['batch'], rounds)


def time_in_turns(models, run, batch, rounds=3, repeats=21):
    """Milliseconds of whole networks (eval mode, on `run`'s device, precision and memory format): each timed in
    turn, `rounds` times over, and the fastest round's median kept. Whatever else the machine is doing then slows
    them alike, so their ratios hold; a shared machine's noise only ever adds time."""
    nets = [copy.deepcopy(m).eval().to(run['device']) for m in models]
    if run['channels_last']:
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    x = image(batch, 3, (32, 32), run)
    times = [[1000 * time_forward(n, x, run, repeats) for n in nets] for _ in range(rounds)]
    return [min(t) for t in zip(*times)]


def latency_cost(model, args):
    """The latency cost of `model` on --latency-device: the table from --latency-table, checked against this run,
    or built now and saved in --out."""
    run = numerics(args.latency_device_t, args.bf16, args.channels_last)
    if args.latency_table:
        try:
            table = torch.load(args.latency_table, map_location='cpu', weights_only=True)
            meta = table['meta']
        except Exception as e:
            fail(f"--latency-table {args.latency_table}: not a latency table ({type(e).__name__})")
        want = latency_meta(model, run, args.latency_batch)
        wrong = [k for k in want if meta.get(k) != want[k]]
        if wrong:
            fail(f"--latency-table {args.latency_table}: made for another " + ', '.join(
                f"{k} ({meta.get(k)!r}, this run: {want[k]!r})" for k in wrong))
        build_s = 0.0
    else:
        t0 = time.time()
        table = build_latency_table(model, run, args.latency_batch)
        build_s = time.time() - t0
        os.makedirs(args.out, exist_ok=True)
        save_atomic(table, os.path.join(args.out, 'latency_table.pt'))
        print(f"latency table: {len(table['units'])} units timed on {table['meta']['device']} at batch "
              f"{args.latency_batch} in {build_s:.1f} s; dense network {table['dense_ms']:.3f} ms")
    cost = Latency(table, run)
    cost.build_s = build_s
    return cost


# --- 2c. User-defined costs: any function of the kept widths, a black box -------------------------------------------
# --cost NAME=path/to/file.py:function registers `function(widths, group_names)`: widths is a (K, groups) int64 CPU
# tensor (kept channels per group of K candidate networks), group_names the groups' names in order; it returns K
# numbers (any sequence or tensor), the cost of each candidate in its own unit. It is called once per pruning step
# with all K candidates (and by the final mask with every prefix of the ranking), never differentiated; budgets are
# fractions of its value at the dense widths (or absolute values in its unit).

def user_cost(spec, model):
    """NAME=path.py:function -> (NAME, C(widths) -> fraction of the dense value); a bad file is a one-line error."""
    name, _, target = spec.partition('=')
    path, _, fn_name = target.rpartition(':')
    where = f"--cost {spec}"
    if not name.isidentifier() or not path or not fn_name:
        fail(f"{where}: write NAME=path/to/file.py:function")
    if name in BUILT_IN:
        fail(f"{where}: {name!r} is a built-in cost; choose another name")
    if not os.path.isfile(path):
        fail(f"{where}: no such file {path}")
    try:
        module_spec = importlib.util.spec_from_file_location(f"crl_user_cost_{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:
        fail(f"{where}: cannot import {path} ({type(e).__name__}: {first_line(e)})")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        fail(f"{where}: {path} has no function {fn_name!r}")

    def evaluate_fn(widths):
        try:
            v = torch.as_tensor(fn(widths.cpu(), list(model.group_names)), dtype=torch.float64).flatten()
        except Exception as e:
            fail(f"{where}: the function raised {type(e).__name__}: {first_line(e)}")
        if v.shape != (len(widths),):
            fail(f"{where}: returned {tuple(v.shape)} values for {len(widths)} candidates; return one per candidate")
        if not torch.isfinite(v).all():
            fail(f"{where}: returned a non-finite value ({v.tolist()[:4]})")
        return v.to(widths.device)

    probe = torch.tensor([model.widths, [1] * len(model.widths)])
    dense = evaluate_fn(probe)[0].item()  # also checks shape and finiteness on two candidates before any training
    if not dense > 0:
        fail(f"{where}: the dense network's cost is {dense}; it must be positive to take fractions of it")
    fraction = lambda widths: evaluate_fn(widths) / dense  # noqa: E731
    fraction.dense = dense
    return name, fraction


# ---------------------------------------------------------------------------------------------------------------------
# 3. The policy: pi_theta(m) = prod_c Bernoulli(m_c; p_c),  p = sigmoid(theta), one entry per channel of every group
# ---------------------------------------------------------------------------------------------------------------------

class Policy(nn.Module):
    def __init__(self, widths, init_keep):
        super().__init__()
        self.widths = list(widths)
        self.theta = nn.Parameter(torch.full((sum(widths),), math.log(init_keep / (1 - init_keep))))
        # channel -> group one-hot matrix: kept widths of K masks are one matrix product
        self.register_buffer('groups', torch.repeat_interleave(torch.eye(len(widths)), torch.tensor(widths), 0),
                             persistent=False)

    def dist(self):
        return torch.distributions.Bernoulli(logits=self.theta, validate_args=False)  # checks would sync the GPU

    def sample(self, k):
        """k masks, a (k, channels) tensor of zeros and ones."""
        p = torch.sigmoid(self.theta.detach()).nan_to_num(0.5)  # NaN logits: caught at the next progress line
        return torch.bernoulli(p.expand(k, -1))

    def log_prob(self, masks):
        """log pi(m) = sum_c m_c log p_c + (1 - m_c) log(1 - p_c), one value per mask."""
        return self.dist().log_prob(masks).sum(-1)

    def split(self, masks):
        """One (k, width) block per group, the form the models take."""
        return masks.split(self.widths, -1)

    def kept(self, masks):
        """Kept widths per group, the input of every cost."""
        return (masks @ self.groups).round().long()


# ---------------------------------------------------------------------------------------------------------------------
# 4. REINFORCE with a baseline on the Lagrangian reward
# ---------------------------------------------------------------------------------------------------------------------

def reinforce_loss(policy, masks, reward, cost, budget, lam):
    """Surrogate loss whose gradient is minus the policy gradient of the Lagrangian, for K masks.
    reward: (K,), cost: (K, J) values C_j(m_k), budget and lam: (J,)."""
    lagrangian = reward - (cost - budget) @ lam           # L_k = R_k - sum_j lambda_j (C_j(m_k) - b_j)
    k = len(lagrangian)
    advantage = (lagrangian - lagrangian.mean()) * k / (k - 1)  # L_k - b_k, b_k = mean of the other K-1 (unbiased)
    return -(advantage.detach().float() * policy.log_prob(masks)).mean()  # grad: -mean_k (L_k - b_k) grad log pi(m_k)


def crl_step(model, policy, costs, budget, lam, x, y, k):
    """Sample K masks and score all K sub-networks in one forward pass: slice k of the batch is the same images under
    mask k (common random numbers: rewards differ only through the masks; BN statistics are per slice, so the
    reward of mask k depends on mask k alone). Returns the weights' loss (the mean cross-entropy of the sampled
    sub-networks, so the weights adapt to them), the policy's loss, the sampled costs and the logits."""
    masks = policy.sample(k)
    n = len(x)
    logits = model(torch.cat([x] * k), policy.split(masks))  # the images k times over; cat keeps channels_last
    ce = F.cross_entropy(logits.float(), y.repeat(k), reduction='none').view(k, n).mean(1)
    kept = policy.kept(masks)
    cost = torch.stack([c(kept) for c in costs.values()], 1)  # C_j(m_k), (K, J): evaluated, never differentiated
    return ce.mean(), reinforce_loss(policy, masks, -ce.detach(), cost, budget, lam), cost, logits


# ---------------------------------------------------------------------------------------------------------------------
# 5. The dual step
# ---------------------------------------------------------------------------------------------------------------------
# Plain projected ascent, lambda_j <- max(0, lambda_j + eta (mean_k C_j(m_k) - b_j)), integrates the violation: while
# the cost starts far over a small budget (0.8 against 0.1, say) lambda grows for a long time, and once the budget is
# met it can shrink only by eta * b_j per step, so the policy keeps being pushed far below the budget. Two changes
# damp this. The violation is measured relative to the budget and clipped, e = clip((C - b) / b, -1, 1), so lambda
# winds down below the budget as fast as it wound up above it, whatever the budget. And a term proportional to the
# current violation (Platt & Barr 1988; the PI-Lagrangian of Stooke et al. 2020) takes pressure off as soon as the
# cost nears the budget. README "Dual dynamics" shows both on a probe.

def dual_step(integral, cost, budget, eta, damping):
    """Returns the new integral term and the multipliers lambda_j = max(0, I_j + damping * e_j), with the violation
    e_j = (C_j - b_j) / b_j clipped to [-1, 1]: lambda winds down below the budget as fast as it wound up above it."""
    error = ((cost - budget) / budget).clamp(-1, 1)
    integral = (integral + eta * error).clamp(min=0)   # I_j <- max(0, I_j + eta e_j): projected dual ascent
    return integral, (integral + damping * error).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------------
# 6. The final mask: most probable channels first, as many as every budget allows, at least one per group
# ---------------------------------------------------------------------------------------------------------------------
# With `multiple` > 1 every group keeps a multiple of that many channels (a group narrower than that keeps all of its
# channels): a GPU's tensor cores run bf16 convolutions fast only on such widths, and a compact network of odd
# widths can be slower than the dense one there (README, Speed).

def keep_top(policy, counts):
    """The mask that keeps, in every group, its counts[g] most probable channels."""
    theta = policy.theta.detach()
    m, start = torch.zeros_like(theta), 0
    for w, k in zip(policy.widths, counts):
        m[start + theta[start:start + w].topk(k).indices] = 1
        start += w
    return m


def rounded(widths, counts, multiple):
    """Kept counts per group, (..., groups), rounded down to a multiple of `multiple`, at least min(multiple, width)
    per group (a tensor)."""
    counts = torch.as_tensor(counts)
    return torch.maximum(counts - counts % multiple, torch.tensor(widths, device=counts.device).clamp(max=multiple))


def minimal_mask(policy, multiple=1):
    """The most probable channel of every group (`multiple` of them): the smallest network there is."""
    return keep_top(policy, rounded(policy.widths, [1] * len(policy.widths), multiple).tolist())


def within(policy, costs, budget, mask):
    """Whether the network that keeps `mask` meets every budget."""
    return all(c(policy.kept(mask[None]))[0].item() <= b for c, b in zip(costs.values(), budget.tolist()))


def final_mask(policy, costs, budget, multiple=1):
    """Rank channels by keep-probability and keep the longest prefix of the ranking that meets every budget (its
    counts rounded to `multiple` per group, at least the minimal network). The widths of every prefix are evaluated
    at once, one call of each cost on all of them, so a cost that can fall when a channel is added (measured latency,
    a user's function) still gets the longest prefix within budget."""
    order = policy.theta.detach().argsort(descending=True)
    counts = torch.cat([torch.zeros_like(policy.groups[:1]), policy.groups[order].cumsum(0)]).round().long()
    counts = rounded(policy.widths, counts, multiple)  # row n: kept widths of the first n channels
    ok = torch.stack([c(counts) <= b for c, b in zip(costs.values(), budget.tolist())]).all(0)
    if not ok.any():
        fail(f'the budget is below the smallest network ({multiple} channel(s) per group)')
    return keep_top(policy, counts[ok.nonzero().max()].tolist())


# ---------------------------------------------------------------------------------------------------------------------
# 7. Physical compaction
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def compact(model, masks):
    """The smaller network keeping the channels where `masks` (one 0/1 vector per group) is 1, with the kept weights
    and BN statistics copied. In eval mode it computes what `model` computes under those masks."""
    keep = [m.nonzero().squeeze(1) for m in masks]
    small = build(model.arch, [len(k) for k in keep], model.num_classes).to(next(model.parameters()).device)
    for big, little in zip(units(model), units(small)):
        for t, target in zip(big.state_dict().values(), little.state_dict().values()):
            for d, g in big.dim_groups(t):
                t = t.index_select(d, keep[g])
            target.copy_(t)
    return small


def save_atomic(obj, path):
    """torch.save under a temporary name, then a rename: a kill during the save leaves the previous file whole."""
    path = os.fspath(path)
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def save_model(model, path, mean, std):
    """A plain dict that torch.load(..., weights_only=True) opens; load_pruned rebuilds the network from it."""
    save_atomic({'arch': model.arch, 'num_classes': model.num_classes, 'widths': model.widths,
                 'state_dict': model.state_dict(), 'mean': mean.tolist(), 'std': std.tolist()}, path)


def load_pruned(path, device='cpu'):
    """The network stored by this script (pruned.pt or dense.pt) as an nn.Module in eval mode. Inputs are 32x32
    images normalised with the checkpoint's `mean` and `std` (per channel, pixel values in [0, 1])."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = build(ckpt['arch'], ckpt['widths'], ckpt['num_classes']).to(device)
    model.load_state_dict(ckpt['state_dict'])
    return model.eval()


def onnx_available():
    """torch's ONNX exporter needs the onnxscript package (which brings onnx)."""
    return all(importlib.util.find_spec(m) is not None for m in ('onnx', 'onnxscript'))


def export_pruned(path, out_path):
    """Export the network of a checkpoint saved by this script (pruned.pt or dense.pt) for deployment without this
    file: ONNX if out_path ends in .onnx (needs onnxscript), else a torch.export program (.pt2, opened with
    torch.export.load(out_path).module()). Input: float32 (N, 3, 32, 32) RGB images, pixel values in [0, 1]
    normalised as (x - mean) / std per channel, any batch size N; output: (N, classes) logits. That normalisation is
    stated in the ONNX file's metadata_props (lists as JSON text), or in a JSON file next to the .pt2 (same name,
    .json). Returns the metadata."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    model = load_pruned(path)
    meta = {'arch': ckpt['arch'], 'widths': ckpt['widths'], 'classes': ckpt['num_classes'],
            'mean': ckpt['mean'], 'std': ckpt['std'], 'input_layout': 'NCHW', 'input_shape': ['N', 3, 32, 32],
            'input': 'float32 RGB images, pixel values in [0, 1], normalised as (x - mean) / std per channel',
            'output': 'logits, (N, classes)'}
    example, batch = (torch.randn(2, 3, 32, 32),), ({0: torch.export.Dim('batch', min=1, max=65536)},)
    if out_path.endswith('.onnx'):
        import onnx
        program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=batch, input_names=['input'],
                                    output_names=['logits'], verbose=False)
        proto = program.model_proto
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
        onnx.save(proto, out_path)
    else:
        torch.export.save(torch.export.export(model, example, dynamic_shapes=batch), out_path)
        with open(os.path.splitext(out_path)[0] + '.json', 'w') as f:
            json.dump(meta, f, indent=1)
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# 8. Data and training loops
# ---------------------------------------------------------------------------------------------------------------------
# The whole dataset lives on the device as one uint8 tensor; batches are gathered, normalised and augmented there as
# batched tensor ops (no per-image PIL work, no DataLoader). On CUDA: channels_last and bf16 autocast (`numerics`).

def load_image(path):
    """One image as a (32, 32, 3) uint8 array. 16-bit grey images are scaled to 8 bits (PIL's RGB conversion would
    saturate them); an alpha channel is dropped, as torchvision's loader does. An unreadable file is a one-line
    error naming it."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith('I'):  # 16- or 32-bit integer pixels
                a = np.asarray(img).astype(np.float64)
                img = Image.fromarray((a * 255 / (65535 if a.max() > 255 else 255)).clip(0, 255).astype(np.uint8))
            return np.asarray(img.convert('RGB').resize((32, 32)))
    except OSError as e:
        fail(f"--data: cannot read image {path} ({first_line(e)})")


@functools.lru_cache(maxsize=4)  # a process that runs main() many times (bench/compare.py) decodes each folder once
def read_image_folder(root):
    """An ImageFolder directory as (uint8 images (N, 3, 32, 32), labels, class names); images resized to 32x32,
    decoded by a pool of threads (PIL releases the GIL while it decodes)."""
    import numpy as np
    import torchvision
    from concurrent.futures import ThreadPoolExecutor
    ds = torchvision.datasets.ImageFolder(root)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        x = np.stack(list(pool.map(lambda s: load_image(s[0]), ds.samples, chunksize=256)))
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes


def image_folder_splits(data):
    """train/ and test/ (or val/) of an ImageFolder directory and its number of classes, checked without reading
    any image."""
    test = next((os.path.join(data, s) for s in ('test', 'val') if os.path.isdir(os.path.join(data, s))), None)
    if not os.path.isdir(os.path.join(data, 'train')) or test is None:
        fail(f"--data {data}: expected an ImageFolder directory with train/ and test/ (or val/) subfolders")
    import torchvision
    classes = []
    for split in (os.path.join(data, 'train'), test):
        try:
            classes.append(torchvision.datasets.ImageFolder(split).classes)
        except (FileNotFoundError, OSError) as e:
            fail(f"--data {data}: {split} holds no images in class subfolders ({first_line(e)})")
    if classes[0] != classes[1]:
        fail(f"--data {data}: train/ and test/ have different classes")
    return os.path.join(data, 'train'), test, len(classes[0])


def load_data(args, device):
    """{'train': (x, y), 'test': (x, y), 'classes': n, 'mean': ..., 'std': ...}, all on `device`, and how every loop
    feeds it to a network: {'bf16': ..., 'channels_last': ...} (see `numerics`)."""
    if args.data:
        train_dir, test_dir, _ = image_folder_splits(args.data)
        (xtr, ytr, classes), (xte, yte, _) = read_image_folder(train_dir), read_image_folder(test_dir)
    else:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if args.dataset == 'cifar10' else torchvision.datasets.CIFAR100
        try:
            tr, te = (cls(args.data_root, train=t, download=True) for t in (True, False))
        except Exception as e:
            fail(f"could not download {args.dataset} into {args.data_root} ({type(e).__name__}); without internet, "
                 f"pass --data DIR, a folder of images in ImageFolder layout (train/ and test/)")
        (xtr, ytr), (xte, yte) = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
                                  for d in (tr, te)]
        classes = tr.classes
    if args.subset > len(xtr):
        fail(f"--subset {args.subset}: the training set has only {len(xtr)} images")
    if args.subset:
        keep = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:args.subset]
        xtr, ytr = xtr[keep], ytr[keep]
    if len(xtr) < args.batch_size:  # BatchNorm needs whole batches (BN1d after fc1: more than one value per channel)
        fail(f"{len(xtr)} training images, fewer than one batch (--batch-size {args.batch_size}); lower --batch-size "
             f"or raise --subset")
    mean = xtr.float().mean((0, 2, 3)) / 255
    std = (xtr.float().std((0, 2, 3)) / 255).clamp(min=1 / 255)  # a constant channel must not divide by zero
    return {'train': (xtr.to(device), ytr.to(device)), 'test': (xte.to(device), yte.to(device)),
            'classes': len(classes), 'mean': mean, 'std': std, **numerics(device, args.bf16, args.channels_last)}


def augment(x):
    """Pad-4 random crop and random horizontal flip of a whole batch (N, C, H, W) at once, as one gather."""
    n, c, h, w = x.shape
    x = F.pad(x, (4, 4, 4, 4))  # after normalisation: pads with the mean colour
    dev = x.device
    i, j = torch.randint(0, 9, (n, 1, 1, 1), device=dev), torch.randint(0, 9, (n, 1, 1, 1), device=dev)
    flip = torch.rand(n, 1, 1, 1, device=dev) < 0.5
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    cols = j + torch.where(flip, w - 1 - cols, cols)
    rows = i + torch.arange(h, device=dev).view(1, 1, h, 1)
    return x[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]


def batches(data, split, batch_size, train):
    """Normalised batches of one split: shuffled, augmented and without a short last batch when training."""
    x, y = data[split]
    mean, std = (t.to(x.device).view(1, 3, 1, 1) for t in (data['mean'], data['std']))
    n = len(x)
    order = torch.randperm(n, device=x.device) if train else torch.arange(n, device=x.device)
    count = max(n // batch_size, 1) if train else math.ceil(n / batch_size)
    for b in range(count):
        idx = order[b * batch_size:(b + 1) * batch_size]
        xb = (x[idx].float() / 255 - mean) / std
        if train:
            xb = augment(xb)
        if data['channels_last']:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb, y[idx]


def numerics(device, bf16='auto', channels_last='auto'):
    """The two GPU settings, made explicit: bf16 autocast (matrix products in bfloat16, losses, rewards and costs in
    float32/float64) and the channels_last memory format. 'auto' turns both on on CUDA and off elsewhere; 'on' and
    'off' force them on any device, so the CPU tests exercise the GPU path."""
    pick = lambda v: device.type == 'cuda' if v == 'auto' else v == 'on'  # noqa: E731
    return {'device': device, 'bf16': pick(bf16), 'channels_last': pick(channels_last)}


def autocast(run):
    """bf16 autocast where `run` (the data, or any dict from `numerics`) asks for it, on its device."""
    return torch.autocast(run['device'].type, dtype=torch.bfloat16, enabled=run['bf16'])


@torch.no_grad()
def evaluate(model, data):
    """Top-1 accuracy on the test split, in eval mode (BN running statistics)."""
    model.eval()
    correct = torch.zeros((), device=data['test'][0].device)
    for xb, yb in batches(data, 'test', 1000, train=False):
        with autocast(data):
            correct += (model(xb).argmax(1) == yb).sum()
    model.train()
    return correct.item() / len(data['test'][1])


@torch.no_grad()
def recalibrate_bn(model, data, count=20):
    """BN running statistics of the network itself, averaged over `count` training batches: after pruning they
    replace the statistics that many sampled masks accumulated together in the dense network."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    model.train()
    for _, (x, _) in zip(range(count), batches(data, 'train', 256, train=True)):
        with autocast(data):
            model(x)
    for m in bns:
        m.momentum = 0.1


def sgd(model, lr, steps, args):
    """SGD with Nesterov momentum and weight decay, learning rate on a cosine from `lr` to 0 over `steps`."""
    opt = torch.optim.SGD(model.parameters(), lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1)))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Metrics:
    """metrics.csv in the run folder: one row per printed progress line (`log`) and one per phase with its test
    accuracy (`test_accuracy`), in columns fixed at the start (the constraints are known then), empty cells where a
    column does not apply. With `tensorboard`, the same scalars also go to TensorBoard events in DIR/tensorboard,
    tagged phase/column, over the steps of the phase."""

    def __init__(self, out, constraints, tensorboard=False, resume_after=None):
        self.columns = ['phase', 'epoch', 'step', 'images', 'loss', 'accuracy', 'images_per_s', 'eta_s',
                        *(f'cost_{n}' for n in constraints), *(f'lambda_{n}' for n in constraints),
                        'keep_mean', 'keep_below_0.1', 'keep_above_0.9', 'test_accuracy']
        path, kept = os.path.join(out, 'metrics.csv'), []
        if resume_after and os.path.exists(path):  # (phase, epoch) of the checkpoint: the rows up to it stay
            with open(path, newline='') as f:
                at = lambda r: (PHASES.index(r['phase']), int(r['epoch']))  # noqa: E731
                limit = (PHASES.index(resume_after[0]), resume_after[1])
                kept = [r for r in csv.DictReader(f) if at(r) < limit or at(r) == limit and not r['test_accuracy']]
        self.file = open(path, 'w', newline='')
        self.csv = csv.DictWriter(self.file, self.columns, restval='')  # an unknown column raises: a bug
        self.csv.writeheader()
        self.csv.writerows(kept)
        self.last = {r['phase']: {'epoch': int(r['epoch']), 'step': int(r['step']), 'images': int(r['images'])}
                     for r in kept}  # phase -> its last row's epoch, step and images: where its test accuracy goes
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            if not resume_after:  # --overwrite: the curves of the run replaced would mix with these
                for old in glob.glob(os.path.join(out, 'tensorboard', 'events.out.tfevents.*')):
                    os.remove(old)
            self.tensorboard = SummaryWriter(os.path.join(out, 'tensorboard'))

    def log(self, phase, epoch, step, images, **values):
        """One row: `step` and `images` count from the start of the phase; values: column -> number."""
        self.last[phase] = {'epoch': epoch, 'step': step, 'images': images}
        self.csv.writerow({'phase': phase, 'epoch': epoch, 'step': step, 'images': images, **values})
        self.file.flush()  # a run stopped half-way keeps its rows
        if self.tensorboard:
            for name, value in values.items():
                self.tensorboard.add_scalar(f'{phase}/{name}', value, step)
            self.tensorboard.flush()

    def test_accuracy(self, phase, accuracy):
        """The test accuracy after `phase`, placed at its last step (0 for a phase that ran none)."""
        self.log(phase, **self.last.get(phase, {'epoch': 0, 'step': 0, 'images': 0}), test_accuracy=accuracy)

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()


def duration(seconds):
    """'45s', '1m23s' or '2h05m'."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Sums of loss, correct predictions (and costs) kept as one device tensor, so that a step never waits for the
    device; one line is printed every `every` steps and at the end of each epoch, and is also a row of `metrics`.
    Throughput and the estimate of the time left in the phase (of `total_steps`) are steady-state: timed from the end
    of the first `warmup` steps, whose extra time (compilation, cuDNN autotuning) is reported apart."""

    def __init__(self, phase, every, device, n_costs=0, warmup=5, total_steps=0, metrics=None):
        self.phase, self.every, self.device, self.warmup = phase, every, device, warmup
        self.total_steps, self.metrics = total_steps, metrics
        self.sums = torch.zeros(2 + n_costs, device=device, dtype=torch.float64)
        self.images = self.seen = self.steps = 0
        self.start = self.tick = time.time()
        self.warm = None  # (time, images) once the warm-up steps are done

    def add(self, loss, logits, y, cost=None):
        n = len(y)
        extra = [] if cost is None else list(cost.mean(0) * n)
        self.sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(), *extra])
        self.images += n
        self.steps += 1
        if self.steps == self.warmup:  # one device sync per phase
            sync(self.device)
            self.warm = (time.time(), self.images)

    def eta(self, now, left):
        """Seconds that `left` more steps take at the steady-state rate (before the warm-up ends: the rate so far)."""
        t, done = (self.warm[0], self.warmup) if self.warm and self.steps > self.warmup else (self.start, 0)
        return left * (now - t) / max(self.steps - done, 1)

    def maybe_print(self, epoch, step, steps, describe=None):
        """describe: mean costs -> (the end of the line, {metrics column: value}), called only when a line is
        printed."""
        if step % self.every and step != steps:
            return
        s, n, now = self.sums.tolist(), self.images - self.seen, time.time()
        if not all(map(math.isfinite, s)):  # checked where the sums reach the host anyway: no extra sync
            fail(f"{self.phase} epoch {epoch} step {step}: the loss or a cost became {s[0] / n} (NaN or inf); "
                 f"training diverged, most likely a learning rate too high for this network (--lr, --prune-lr)")
        done = (epoch - 1) * steps + step  # steps of the phase so far, counted from its start even after a resume
        rate, eta = n / (now - self.tick), self.eta(now, self.total_steps - done)
        text, values = describe([v / n for v in s[2:]]) if describe else ('', {})
        print(f"{self.phase} epoch {epoch} step {step}/{steps} loss {s[0] / n:.3f} acc {s[1] / n:.3f} img/s "
              f"{rate:.0f} eta {duration(eta)} {text}".rstrip(), flush=True)
        if self.metrics:
            self.metrics.log(self.phase, epoch, done, round(done * self.images / self.steps), loss=s[0] / n,
                             accuracy=s[1] / n, images_per_s=round(rate, 1), eta_s=round(eta, 1), **values)
        self.sums.zero_()
        self.tick, self.seen = now, self.images

    def speed(self):
        """{'images_per_s': steady-state training throughput, 'overhead_s': what the warm-up steps took beyond
        the steady-state time of as many steps (compilation, autotuning)}."""
        sync(self.device)
        now = time.time()
        if self.warm is None:  # too few steps for a steady state
            return {'images_per_s': self.images / max(now - self.start, 1e-9), 'overhead_s': 0.0}
        t, images = self.warm
        rate = (self.images - images) / max(now - t, 1e-9)
        return {'images_per_s': rate, 'overhead_s': max(t - self.start - images / rate, 0.0) if rate else 0.0}


# --- 8b. Checkpoints: a run that survives Ctrl-C, a crash or a lost machine ------------------------------------------
# At the end of an epoch (at most once per --checkpoint-every seconds, always at the end of a phase) everything the
# rest of the run depends on goes into OUT/checkpoint.pt: phase and epoch, network, optimisers, scheduler, policy,
# multipliers, random number generators, and what the finished phases measured. --resume continues from there.
# Since the random streams are restored with the rest, the resumed run computes what the uninterrupted one would have
# (bit for bit on the CPU; on a GPU up to its nondeterministic kernels). Every file is written by `save_atomic`.

PHASES = ('dense', 'prune', 'finetune')
DERIVED_ARGS = ('budget_parsed', 'latency_device_t')  # set from the command line's arguments, not saved with them


def rng_state():
    return {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def refuse_diverged(model, where):
    """Stop, with one line, before a network with NaN or infinite weights is saved over a good file."""
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        fail(f"{where}: the weights became NaN or inf; training diverged, most likely a learning rate too high for "
             f"this network (--lr, --prune-lr)")


class Checkpoint:
    """OUT/checkpoint.pt. `report` holds what finished phases measured; `save` and `restore` take the same named
    objects: those with a state_dict (network, optimiser, scheduler, policy) are saved through it, tensors as such."""

    FREE = ('resume', 'overwrite', 'log_every', 'checkpoint_every', *DERIVED_ARGS)  # may change on --resume

    def __init__(self, args=None):  # without args: saves nothing (the loops run alone, e.g. in tests)
        self.state, self.saved, self.report, self.path = None, None, {}, None
        if args is None:
            return
        self.path, self.every = os.path.join(args.out, 'checkpoint.pt'), args.checkpoint_every
        self.last_save = time.time()
        self.args = {k: v for k, v in vars(args).items() if k not in self.FREE}
        if args.resume:
            try:
                self.state = torch.load(self.path, map_location='cpu', weights_only=True)
            except Exception as e:
                fail(f"--resume: cannot read {self.path} ({type(e).__name__}); no interrupted run to continue there")
            changed = [k for k in self.args if self.state['args'].get(k) != self.args[k]]
            if changed:
                fail("--resume: the interrupted run had other arguments: " + ', '.join(
                    f"--{k.replace('_', '-')} {self.state['args'].get(k)!r} (now {self.args[k]!r})" for k in changed))
            self.saved, self.report = (self.state['phase'], self.state['epoch']), self.state['report']

    def reached(self, phase):
        """Whether the checkpoint to resume from is at `phase` or a later one."""
        return self.state is not None and PHASES.index(self.state['phase']) >= PHASES.index(phase)

    def restore(self, phase, **objects):
        """The epoch to continue `phase` from: 1 on a fresh start; on resuming inside `phase`, the one after the saved
        epoch, with `objects` (tensors in place) and the random generators set back to their state at its end."""
        if self.state is None or self.state['phase'] != phase:
            return 1
        for name, obj in objects.items():
            saved = self.state['objects'][name]
            obj.copy_(saved) if isinstance(obj, torch.Tensor) else obj.load_state_dict(saved)
        torch.set_rng_state(self.state['rng']['cpu'])
        if self.state['rng']['cuda']:
            torch.cuda.set_rng_state_all(self.state['rng']['cuda'])
        return self.state['epoch'] + 1

    def save(self, phase, epoch, last, **objects):
        """At the end of `epoch`: written when --checkpoint-every seconds have passed, and always when `last`."""
        if self.path is None or not (last or time.time() - self.last_save >= self.every):
            return
        refuse_diverged(objects['model'], f"{phase} epoch {epoch}")
        state = {name: obj.state_dict() if hasattr(obj, 'state_dict') else obj for name, obj in objects.items()}
        save_atomic({'phase': phase, 'epoch': epoch, 'args': self.args, 'objects': state, 'rng': rng_state(),
                     'report': self.report}, self.path)
        self.last_save, self.saved = time.time(), (phase, epoch)

    def describe(self):
        return f"{self.path} holds the state at the end of {self.saved[0]} epoch {self.saved[1]}"


def train(model, data, epochs, lr, args, phase, checkpoint=None, metrics=None):
    """Supervised training of a whole network (the dense one, then the compact one)."""
    device = data['train'][0].device
    per_epoch = max(len(data['train'][1]) // args.batch_size, 1)
    opt, sched = sgd(model, lr, epochs * per_epoch, args)
    checkpoint = checkpoint or Checkpoint()
    start = checkpoint.restore(phase, model=model, opt=opt, sched=sched)
    net = torch.compile(model) if args.compile else model
    progress = Progress(phase, args.log_every, device, total_steps=epochs * per_epoch, metrics=metrics)
    model.train()
    for epoch in range(start, epochs + 1):
        for step, (x, y) in enumerate(batches(data, 'train', args.batch_size, train=True), 1):
            with autocast(data):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress.add(loss, logits, y)
            progress.maybe_print(epoch, step, per_epoch)
        checkpoint.save(phase, epoch, epoch == epochs, model=model, opt=opt, sched=sched)
    return progress.speed()


def prune(model, policy, costs, budget, data, args, checkpoint=None, metrics=None):
    """The CRL pruning phase: policy gradient on theta, dual ascent on lambda and SGD on the weights, every step.
    A pruning epoch processes as many images as a dense epoch: batch_size / K distinct images per step, each seen
    under all K masks."""
    device = data['train'][0].device
    k = args.samples
    n = max(args.batch_size // k, 1)
    per_epoch = max(len(data['train'][1]) // (n * k), 1)
    opt_w, sched = sgd(model, args.prune_lr, args.prune_epochs * per_epoch, args)
    opt_p = torch.optim.Adam(policy.parameters(), args.policy_lr)
    integral, lam = torch.zeros_like(budget), torch.zeros_like(budget)
    checkpoint = checkpoint or Checkpoint()
    start = checkpoint.restore('prune', model=model, policy=policy, opt_w=opt_w, opt_p=opt_p, sched=sched,
                               integral=integral, lam=lam)
    net = torch.compile(model) if args.compile else model
    progress = Progress('prune', args.log_every, device, len(budget), total_steps=args.prune_epochs * per_epoch,
                        metrics=metrics)
    model.train()

    def describe(mean_cost):  # the expected cost of each constraint next to its multiplier, and the keep-probs.
        lams, p = lam.tolist(), torch.sigmoid(policy.theta.detach())
        keep = torch.stack([p.mean(), (p < 0.1).float().mean(), (p > 0.9).float().mean()]).tolist()
        pairs = lambda values: ' '.join(f"{name}={v:.3f}" for name, v in zip(costs, values))  # noqa: E731
        return (f"cost {pairs(mean_cost)} lam {pairs(lams)} keep {keep[0]:.3f}",
                {**{f'cost_{name}': v for name, v in zip(costs, mean_cost)},
                 **{f'lambda_{name}': v for name, v in zip(costs, lams)},
                 'keep_mean': keep[0], 'keep_below_0.1': keep[1], 'keep_above_0.9': keep[2]})

    for epoch in range(start, args.prune_epochs + 1):
        for step, (x, y) in zip(range(1, per_epoch + 1), batches(data, 'train', n, train=True)):
            with autocast(data):
                loss, policy_loss, cost, logits = crl_step(net, policy, costs, budget, lam, x, y, k)
            opt_w.zero_grad(set_to_none=True)
            opt_p.zero_grad(set_to_none=True)
            (loss + policy_loss).backward()
            opt_w.step()
            opt_p.step()
            sched.step()
            integral, lam = dual_step(integral, cost.mean(0), budget, args.dual_lr, args.damping)
            progress.add(loss, logits, y.repeat(k), cost)
            progress.maybe_print(epoch, step, per_epoch, describe)
        if not (torch.isfinite(lam).all() and torch.isfinite(policy.theta).all()):
            fail(f"prune epoch {epoch}: the multipliers or the policy became NaN or inf; lower --dual-lr, "
                 f"--damping or --policy-lr")
        checkpoint.save('prune', epoch, epoch == args.prune_epochs, model=model, policy=policy, opt_w=opt_w,
                        opt_p=opt_p, sched=sched, integral=integral, lam=lam)
    return progress.speed(), lam


# ---------------------------------------------------------------------------------------------------------------------
# 9. Command line
# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description='Prune a CIFAR network under a budget with constrained RL.')
    p.error = fail  # bad arguments: one line, like every other bad input
    p.add_argument('--arch', default='vgg16', help=f"one of {', '.join(ARCHS)}")
    p.add_argument('--budget', default='params=0.1', help="comma-separated name=fraction of the dense network or "
                   "name=value with a unit; names: params, macs, latency and those of --cost (e.g. params=0.1,"
                   "macs=40M, latency=0.3, latency=2.5ms)")
    p.add_argument('--cost', action='append', default=[], metavar='NAME=FILE.py:FUNCTION',
                   help='register a cost function(widths, group_names) -> K values (repeatable); see README')
    p.add_argument('--latency-device', help='where latency is measured (default: the run\'s device)')
    p.add_argument('--latency-batch', type=int, default=1, help='batch size at which latency is measured')
    p.add_argument('--latency-table', help='reuse the latency_table.pt of an earlier run (same device, batch, arch)')
    p.add_argument('--dataset', default='cifar10', choices=['cifar10', 'cifar100'], help='torchvision dataset')
    p.add_argument('--data', help='an ImageFolder directory with train/ and test/ (or val/); replaces --dataset')
    p.add_argument('--data-root', default='./data', help='where --dataset is downloaded')
    p.add_argument('--subset', type=int, default=0, help='train on this many training images only (0: all)')
    p.add_argument('--pretrained', help='a dense checkpoint (dense.pt of an earlier run): skips dense training')
    p.add_argument('--width', type=float, default=1.0, help='multiplier of every layer width')
    p.add_argument('--dense-epochs', type=int, default=60)
    p.add_argument('--prune-epochs', type=int, default=20)
    p.add_argument('--finetune-epochs', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--lr', type=float, default=0.1, help='peak learning rate of dense training and fine-tuning')
    p.add_argument('--prune-lr', type=float, default=0.02, help='peak learning rate of the weights while pruning')
    p.add_argument('--wd', type=float, default=5e-4, help='weight decay')
    p.add_argument('--samples', type=int, default=8, help='K, masks sampled per pruning step')
    p.add_argument('--policy-lr', type=float, default=0.2, help='Adam learning rate of the policy logits')
    p.add_argument('--dual-lr', type=float, default=0.01, help='eta, step of the dual ascent')
    p.add_argument('--damping', type=float, default=10.0, help='weight of the proportional term of the multipliers')
    p.add_argument('--init-keep', type=float, default=0.9, help='initial keep-probability of every channel')
    p.add_argument('--reinit', action='store_true', help='train the compact network from random initialisation '
                   'for --finetune-epochs instead of fine-tuning the weights it inherits')
    p.add_argument('--channel-multiple', type=int, default=0, help='the final network keeps a multiple of this many '
                   'channels per group (0: 8 on CUDA, where tensor cores want it, 1 elsewhere)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--bf16', default='auto', choices=['auto', 'on', 'off'],
                   help='bf16 autocast (auto: on CUDA only; on/off: force, on any device)')
    p.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'],
                   help='channels_last memory format (auto: on CUDA only; on/off: force, on any device)')
    p.add_argument('--compile', action='store_true', help='torch.compile the training steps')
    p.add_argument('--speed', action='store_true', help='also time inference of the dense and the pruned network')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--log-every', type=int, default=100, help='steps between progress lines')
    p.add_argument('--tensorboard', action='store_true', help='also write the scalars of metrics.csv as TensorBoard '
                   'events into OUT/tensorboard (needs the tensorboard package)')
    p.add_argument('--export', action='store_true', help='also export the pruned network: pruned.onnx where '
                   'onnxscript is installed, else pruned.pt2 (torch.export) with pruned.json')
    p.add_argument('--out', help='output directory (default: runs/ARCH-BUDGET)')
    p.add_argument('--overwrite', action='store_true', help='replace the results already in --out')
    p.add_argument('--resume', action='store_true', help='continue the interrupted run in --out from its checkpoint')
    p.add_argument('--checkpoint-every', type=float, default=60, metavar='SECONDS',
                   help='least time between two checkpoints (one is always written at the end of each phase)')
    args = p.parse_args(argv)
    if args.arch not in ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    names = [spec.partition('=')[0] for spec in args.cost]
    args.budget_parsed = parse_budget(args.budget, BUILT_IN + names)
    if args.latency_batch < 1:
        fail('--latency-batch must be >= 1')
    for name in ('dense_epochs', 'prune_epochs', 'finetune_epochs', 'subset'):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0")
    for name in ('width', 'batch_size', 'lr', 'prune_lr', 'policy_lr', 'log_every'):
        if not 0 < getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be a positive finite number")
    for name in ('wd', 'dual_lr', 'damping', 'checkpoint_every'):
        if not 0 <= getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be a finite number >= 0")
    if args.prune_epochs < 1:
        fail('--prune-epochs must be >= 1: the final mask is read off the trained policy')
    if args.channel_multiple < 0:
        fail('--channel-multiple must be >= 0')
    if args.samples < 2:
        fail('--samples must be >= 2 (the baseline of each mask is the mean reward of the others)')
    if args.batch_size < 2 * args.samples:
        fail(f"--batch-size {args.batch_size}: at least 2 images per sampled mask are needed (BatchNorm statistics "
             f"per mask), so at least 2 x --samples = {2 * args.samples}")
    if not 0 < args.init_keep < 1:
        fail('--init-keep must be in (0, 1)')
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            fail('--tensorboard needs the tensorboard package (pip install tensorboard); metrics.csv has the same '
                 'scalars without it')
    args.out = args.out or os.path.join('runs', f"{args.arch}-{args.budget.replace('=', '').replace(',', '-')}")
    return args


UNITS = {'K': 1e3, 'M': 1e6, 'G': 1e9, 'us': 1e-3, 'ms': 1.0, 's': 1e3}  # counts; latency in ms


def parse_budget(text, names=BUILT_IN):
    """'params=0.1,macs=40M,latency=2.5ms' -> {name: (number, unit)}: a plain number is a fraction of the dense
    network in (0, 1]; with a unit it is absolute (K, M, G for counts; us, ms, s for latency), resolved against the
    dense network by `resolve_budget`."""
    budget = {}
    for item in text.split(','):
        name, _, value = item.partition('=')
        name, value = name.strip(), value.strip()
        if name not in names:
            fail(f"--budget {text!r}: unknown cost {name!r}; use {', '.join(names)} (or register one with --cost)")
        if name in budget:
            fail(f"--budget {text!r}: {name} is given twice")
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if value.endswith(u)), '')
        try:
            number = float(value[:len(value) - len(unit)])
        except ValueError:
            fail(f"--budget {text!r}: {value!r} is not a number; write name=fraction (params=0.1) or name=value with "
                 f"a unit (params=1.5M, latency=2.5ms)")
        if unit and (unit in ('us', 'ms', 's')) != (name == 'latency'):
            fail(f"--budget {text!r}: {name} takes {'us, ms or s' if name == 'latency' else 'K, M or G'}, not {unit}")
        if not math.isfinite(number) or number <= 0 or (not unit and number > 1):
            fail(f"--budget {text!r}: {name} must be a fraction of the dense network in (0, 1], or a positive value "
                 f"with a unit (e.g. params=1.5M, latency=2.5ms)")
        budget[name] = (number, unit)
    return budget


def resolve_budget(budget, dense):
    """{name: (number, unit)} and the dense network's own value of every cost -> {name: fraction of it}."""
    fractions = {}
    for name, (number, unit) in budget.items():
        fractions[name] = number * UNITS[unit] / dense[name] if unit else number
        if fractions[name] > 1:
            fail(f"--budget {name}={number:g}{unit}: more than the dense network's {dense[name]:g}"
                 f"{'ms' if name == 'latency' else ''}; nothing to prune")
    return fractions


def load_dense(args, model):
    """Weights of --pretrained into `model`; any mismatch is a one-line error."""
    try:
        ckpt = torch.load(args.pretrained, map_location='cpu', weights_only=True)
        state = ckpt['state_dict'] if isinstance(ckpt, dict) and 'state_dict' in ckpt else ckpt
        model.load_state_dict(state)
        return {k: torch.tensor(ckpt[k]) for k in ('mean', 'std') if k in ckpt}  # the inputs it was trained on
    except Exception as e:
        fail(f"--pretrained {args.pretrained}: cannot load it into a dense {args.arch} of width {args.width} "
             f"({type(e).__name__}: {first_line(e)})")


@torch.no_grad()
def inference_speed(model, data, repeats=20):
    """Median batch-1 latency (ms) and batch-512 throughput (images/s) in eval mode, with the run's precision and
    memory format, after 3 warm-up runs; timed with CUDA events on a GPU."""
    model.eval()
    median = {b: time_forward(model, image(b, 3, (32, 32), data), data, repeats) for b in (1, 512)}
    model.train()
    return {'latency_ms_batch1': 1000 * median[1], 'images_per_s_batch512': 512 / median[512]}


def print_speed(results):
    """The --speed report: wall time and training throughput per phase, then inference of both networks."""
    print('phase     wall s   train img/s (steady)   first-steps overhead s')
    for phase in ('dense', 'prune', 'finetune'):
        print(f"{phase:8} {results['time_s'][phase]:7.1f} {results['images_per_s'][phase]:21.0f} "
              f"{results['overhead_s'][phase]:24.1f}")
    d, p = results['speed']['dense'], results['speed']['pruned']
    print(f"inference  batch-1 latency ms   batch-512 img/s   MACs\n"
          f"dense      {d['latency_ms_batch1']:18.3f} {d['images_per_s_batch512']:17.0f}   "
          f"{results['dense']['macs']:,}\n"
          f"pruned     {p['latency_ms_batch1']:18.3f} {p['images_per_s_batch512']:17.0f}   "
          f"{results['pruned']['macs']:,}\n"
          f"speed-up   {d['latency_ms_batch1'] / p['latency_ms_batch1']:18.2f}x "
          f"{p['images_per_s_batch512'] / d['images_per_s_batch512']:16.2f}x   "
          f"{results['dense']['macs'] / results['pruned']['macs']:.2f}x fewer")


def get_device(name, flag):
    try:
        device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name)
    except RuntimeError:
        fail(f"{flag} {name}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type not in ('cpu', 'cuda') or (device.type == 'cuda' and not torch.cuda.is_available()):
        fail(f"{flag} {name}: not available on this machine; use cpu{' or cuda' if torch.cuda.is_available() else ''}")
    return device


def build_costs(model, args):
    """Every budgeted cost as a black box C(widths) -> fraction of the dense network, in the budget's order, with
    the dense network's own value of each (for absolute budgets and the report)."""
    names = list(args.budget_parsed)
    costs = make_costs(model, [n for n in names if n in COSTS])
    params, macs = measure(model)
    dense = {'params': params, 'macs': macs}
    for spec in args.cost:
        name, cost = user_cost(spec, model)
        costs[name], dense[name] = cost, cost.dense
    if 'latency' in names:
        costs['latency'] = latency_cost(model, args)
        dense['latency'] = costs['latency'].dense_ms
    return {n: costs[n] for n in names}, dense


def fit_latency(model, policy, costs, budget, multiple):
    """The final mask, cut shorter along the same ranking until the compact network's *measured* latency meets its
    budget: each round holds the prediction to a budget lowered by the measured overshoot (at most 20 rounds of at
    most 10% each, an overshoot timed again before it is cut). Returns the mask and {'pruned_ms', 'dense_ms'}: the
    compact and the dense network timed in turns (`time_in_turns`)."""
    latency, j = costs['latency'], list(costs).index('latency')
    target, b = budget[j].item(), budget.clone()
    for _ in range(20):
        mask = final_mask(policy, costs, b, multiple)
        small = compact(model, policy.split(mask))
        small_ms, dense_ms = latency.measure_ms(small, model)
        if small_ms / dense_ms > target:  # timed again before cutting: one slow moment must not cost channels
            small_ms, dense_ms = latency.measure_ms(small, model, rounds=5)
        if small_ms / dense_ms <= target:
            break
        b[j] = b[j] * min(max(target * dense_ms / small_ms, 0.9), 0.98)  # cut in steps of 2 to 10%
        if not within(policy, costs, b, minimal_mask(policy, multiple)):
            break  # nothing smaller to try: reported as over budget
    return mask, {'pruned_ms': small_ms, 'dense_ms': dense_ms}


EXPORTS = ('pruned.onnx', 'pruned.pt2', 'pruned.json')  # what --export may write into the run folder


def main(argv=None):
    args = parse_args(argv)
    device = get_device(args.device, '--device')
    args.latency_device_t = get_device(args.latency_device, '--latency-device') if args.latency_device else device
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file; choose a directory")
    outputs = [os.path.join(args.out, f) for f in ('results.json', 'dense.pt', 'pruned.pt', 'checkpoint.pt', *EXPORTS)]
    written = outputs + [os.path.join(args.out, f) for f in ('metrics.csv', 'policy.pt', 'tensorboard')]
    if args.resume and os.path.exists(outputs[0]):
        fail(f"--resume: the run in {args.out} has finished already (results.json)")
    if not (args.overwrite or args.resume) and any(os.path.exists(f) for f in written):
        fail(f"--out {args.out} already holds results" + (' of an unfinished run: pass --resume to continue it,'
             if os.path.exists(outputs[3]) else ';') + " pass --overwrite to replace them or choose another --out")
    checkpoint = Checkpoint(args)
    if args.resume and args.latency_table is None and 'latency' in args.budget_parsed:
        args.latency_table = os.path.join(args.out, 'latency_table.pt')  # the table the interrupted run used
    try:
        return run(args, device, outputs, checkpoint)
    except KeyboardInterrupt:
        words = sys.argv[1:] if argv is None else list(argv)
        if checkpoint.saved is None:  # nothing to continue from: the same command starts over
            command = shlex.join(['python', 'crl_prune.py', *words, *([] if args.overwrite else ['--overwrite'])])
            raise SystemExit(f"crl_prune: interrupted before the first checkpoint; start again with: {command}")
        command = shlex.join(['python', 'crl_prune.py', *words, *([] if args.resume else ['--resume'])])
        raise SystemExit(f"crl_prune: interrupted; {checkpoint.describe()}; resume with: {command}")


def run(args, device, outputs, checkpoint):
    """The pipeline: dense training, CRL pruning, final mask, compaction, fine-tuning; resumed where `checkpoint`
    was left."""
    classes = image_folder_splits(args.data)[2] if args.data else {'cifar10': 10, 'cifar100': 100}[args.dataset]
    if args.pretrained and not os.path.isfile(args.pretrained):
        fail(f"--pretrained {args.pretrained}: no such file")
    torch.manual_seed(args.seed)
    if args.compile:  # each run compiles its own networks: without this a process that calls main() many times
        torch._dynamo.reset()  # (bench/compare.py) reaches Dynamo's recompile limit and silently runs eagerly

    # The dense network, its costs and the budget's feasibility: all checked before any data is read.
    widths = dense_widths(args.arch, args.width)
    model = build(args.arch, widths, classes)
    stats = load_dense(args, model) if args.pretrained else {}
    costs, dense_cost = build_costs(model, args)
    budget_names = list(costs)
    fraction_budget = resolve_budget(args.budget_parsed, dense_cost)
    budget = torch.tensor(list(fraction_budget.values()), dtype=torch.float64)
    policy = Policy(widths, args.init_keep)
    multiple = args.channel_multiple or (8 if device.type == 'cuda' else 1)
    if not within(policy, costs, budget, minimal_mask(policy, multiple)):
        fail(f"--budget {args.budget}: infeasible, even {multiple} channel(s) per group cost more")

    t0 = time.time()
    data = load_data(args, device)
    data.update(stats)  # a --pretrained network sees its inputs normalised as in its own training
    report = checkpoint.report  # what the finished phases measured (filled in as they finish, saved with the state)
    report.setdefault('time_s', {})['data'] = time.time() - t0
    model.to(device)
    if data['channels_last']:
        model.to(memory_format=torch.channels_last)
    os.makedirs(args.out, exist_ok=True)
    stale = [] if args.resume else [outputs[0], outputs[3], *outputs[4:]]  # --overwrite: the replaced run's results,
    for path in filter(os.path.exists, stale):  # checkpoint and exports go now, so an interruption can be resumed
        os.remove(path)
    metrics = Metrics(args.out, budget_names, args.tensorboard, checkpoint.saved)
    print(f"{args.arch} width {args.width}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(data['train'][1])} train / {len(data['test'][1])} test images, {data['classes']} classes, {device}"
          + (f"; resuming after {checkpoint.saved[0]} epoch {checkpoint.saved[1]}" if checkpoint.saved else ''))
    speed, times = report.setdefault('speed', {}), report['time_s']

    # 1. the dense network
    if not checkpoint.reached('prune'):
        t0 = time.time()
        speed['dense'] = train(model, data, 0 if args.pretrained else args.dense_epochs, args.lr, args, 'dense',
                               checkpoint, metrics)
        times['dense'] = time.time() - t0
        refuse_diverged(model, 'dense training')
        save_model(model, outputs[1], data['mean'], data['std'])
        report['dense_accuracy'] = evaluate(model, data)
        metrics.test_accuracy('dense', report['dense_accuracy'])
    print(f"dense accuracy {report['dense_accuracy']:.4f}")

    # 2. CRL: learn the keep-probabilities under the budget while the weights adapt
    budget, policy = budget.to(device), policy.to(device)
    if not checkpoint.reached('finetune'):
        t0 = time.time()
        speed['prune'], lam = prune(model, policy, costs, budget, data, args, checkpoint, metrics)
        times['prune'] = time.time() - t0
        save_atomic({'theta': dict(zip(model.group_names, policy.split(policy.theta.detach().cpu())))},
                    os.path.join(args.out, 'policy.pt'))  # the final keep-probabilities are sigmoid(theta)
        report['multipliers'] = dict(zip(budget_names, lam.tolist()))
        report['keep_probability_mean'] = torch.sigmoid(policy.theta).mean().item()

        # 3. the final mask (for a latency budget: checked by timing the compact network), compacted
        if 'latency' in costs:
            mask, report['latency_measured'] = fit_latency(model, policy, costs, budget, multiple)
        else:
            mask = final_mask(policy, costs, budget, multiple)
        small = compact(model, policy.split(mask))
        if args.reinit:  # keep the widths CRL found, train them from random initialisation (Liu et al., ICLR 2019)
            small = build(args.arch, small.widths, data['classes']).to(device)
        if data['channels_last']:
            small.to(memory_format=torch.channels_last)
        recalibrate_bn(small, data)
        report['accuracy_before_finetune'], report['widths'] = evaluate(small, data), small.widths
        metrics.test_accuracy('prune', report['accuracy_before_finetune'])
    else:  # resumed while fine-tuning: the compact network's shape; `train` restores its weights
        small = build(args.arch, report['widths'], data['classes']).to(device)
        if data['channels_last']:
            small.to(memory_format=torch.channels_last)
    print(f"compact network kept {small.widths}; accuracy before fine-tuning {report['accuracy_before_finetune']:.4f}")

    # 4. fine-tuning
    t0 = time.time()
    speed['finetune'] = train(small, data, args.finetune_epochs, args.lr, args, 'finetune', checkpoint, metrics)
    times['finetune'] = time.time() - t0
    pruned_acc = evaluate(small, data)
    metrics.test_accuracy('finetune', pruned_acc)
    metrics.close()
    save_model(small, outputs[2], data['mean'], data['std'])

    (dp, dm), (pp, pm) = measure(model), measure(small)
    fractions = {'params': pp / dp, 'macs': pm / dm}  # counted on the compact network itself
    kept = torch.tensor([small.widths])
    fractions.update({n: c(kept).item() for n, c in costs.items() if n not in BUILT_IN})  # user costs
    if 'latency' in costs:
        fractions['latency'] = report['latency_measured']['pruned_ms'] / report['latency_measured']['dense_ms']
    results = {
        'arch': args.arch, 'width': args.width, 'data': args.data or args.dataset, 'device': str(device),
        'budget': fraction_budget,
        'budget_absolute': {n: b * dense_cost[n] for n, b in fraction_budget.items()},
        'budget_met': all(fractions[k] <= b for k, b in fraction_budget.items()),
        'fractions': {n: fractions[n] for n in budget_names},
        'dense': {'params': dp, 'macs': dm, 'accuracy': report['dense_accuracy']},
        'pruned': {'params': pp, 'macs': pm, 'accuracy': pruned_acc,
                   'accuracy_before_finetune': report['accuracy_before_finetune'],
                   'params_fraction': fractions['params'], 'macs_fraction': fractions['macs']},
        'channels': dict(zip(model.group_names, small.widths)),
        'dense_channels': dict(zip(model.group_names, model.widths)),
        'keep_probability_mean': report['keep_probability_mean'], 'channel_multiple': multiple,
        'multipliers': report['multipliers'],
        'time_s': times, 'images_per_s': {phase: s['images_per_s'] for phase, s in speed.items()},
        'overhead_s': {phase: s['overhead_s'] for phase, s in speed.items()},
        'args': {k: v for k, v in vars(args).items() if k not in DERIVED_ARGS},
    }
    if 'latency' in costs:
        lat = costs['latency']
        results['latency'] = {
            'device': lat.table['meta']['device'], 'batch': args.latency_batch, 'bf16': lat.run['bf16'],
            'channels_last': lat.run['channels_last'], 'table_build_s': lat.build_s,
            'dense_measured_ms': report['latency_measured']['dense_ms'],
            'dense_predicted_ms': lat.dense_predicted_ms,
            'pruned_measured_ms': report['latency_measured']['pruned_ms'],
            'pruned_predicted_ms': lat.predict_ms(kept).item()}
        r = results['latency']
        print(f"latency on {r['device']}, batch {args.latency_batch}, timed in turns: dense "
              f"{r['dense_measured_ms']:.3f} ms, pruned {r['pruned_measured_ms']:.3f} ms "
              f"({fractions['latency']:.3f} of dense, budget {fraction_budget['latency']:.3f}); "
              f"predicted {r['pruned_predicted_ms']:.3f} ms")
    if args.speed:
        results['speed'] = {'dense': inference_speed(model, data), 'pruned': inference_speed(small, data)}
        print_speed(results)
    with open(outputs[0] + '.tmp', 'w') as f:
        json.dump(results, f, indent=2)
    os.replace(outputs[0] + '.tmp', outputs[0])
    if os.path.exists(outputs[3]):
        os.remove(outputs[3])  # the run is complete: its results replace the checkpoint
    print(f"dense  {dp:,} params {dm:,} MACs accuracy {report['dense_accuracy']:.4f}\n"
          f"pruned {pp:,} params ({fractions['params']:.3f}) {pm:,} MACs ({fractions['macs']:.3f}) "
          f"accuracy {pruned_acc:.4f}; budget met: {results['budget_met']}; results in {args.out}")
    if args.export:  # last: an export that fails leaves every result of the run saved
        exported = os.path.join(args.out, 'pruned.onnx' if onnx_available() else 'pruned.pt2')
        try:
            export_pruned(outputs[2], exported)
        except Exception as e:
            fail(f"--export to {exported} failed ({type(e).__name__}: {first_line(e)}); the run's results are saved "
                 f"in {args.out}")
        print(f"exported the pruned network to {exported}")
    return results


if __name__ == '__main__':
    main()
