"""crl_tp.py: CRL on any convolutional network, its channel groups found by Torch-Pruning's dependency graph.

    pip install -r requirements-extras.txt          # torch-pruning (crl_prune.py itself needs torch only)
    python crl_prune.py --arch torchvision:mobilenet_v2 --data DIR --budget params=0.3
    small = crl_tp.prune_network(torchvision.models.resnet18(num_classes=10), batches, {'params': 0.3})

crl_prune.py prunes networks written with its Unit layers. This module takes an unmodified nn.Module instead:
Torch-Pruning traces it from an example input and finds its coupled channel groups (the channels a residual addition
sums, a depthwise convolution and its input, a concatenation's parts), and those become CRL's groups. Everything
else is crl_prune's own, unchanged: the policy, REINFORCE with the leave-one-out baseline, the dual step, the final
mask, the loops. This module adds what a traced network needs:
  1. Traced         the groups; the K masks of a pruning step applied by forward hooks (slice k of the batch under
                    mask k, a masked channel exactly zero, BN statistics per slice); the user's class untouched
  2. costs          parameters and MACs of any kept widths, exactly: every tensor's sizes as affine functions of the
                    widths, read off by removing one channel of each group, so the counts are quadratic forms;
                    latency predicted from MACs and activations, fit to timed networks (the final mask is timed)
  3. compaction     Torch-Pruning removes the dropped channels physically (in `Traced`); loading in a fresh process
  4. the network    `TracedNetwork`, what crl_prune's command line asks of the network it prunes
  5. prune_network  the library call
"""
import copy

import torch
import torch.nn as nn
import torch_pruning as tp

import crl_prune as crl

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# --- 1. Traced: the groups, and masks through forward hooks -----------------------------------------------------------

def output_layer(model, example):
    """The layer whose output is the network's output (the classifier): its channels are never pruned."""
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for m in model.modules()
             if isinstance(m, LAYERS)]
    with torch.no_grad():
        out = model.eval()(example)
    for h in hooks:
        h.remove()
    last = [m for m, o in outputs.items() if o is out or (o.shape == out.shape and torch.equal(o, out))]
    return last[-1] if last else list(outputs)[-1]


class Traced(nn.Module):
    """`model`, unmodified, with CRL's masks: forward(x, masks=None) as crl_prune's loops call it. Groups: the
    prunable channel groups Torch-Pruning finds when it traces `model` at `example`, less those that reach the output
    layer or an `ignored` layer, those of one channel, and those whose channels cannot be counted by width alone
    (part of the group's channels sent elsewhere by a split or slice); `skipped` says which and why."""

    def __init__(self, model, example, ignored=()):
        super().__init__()
        self.model, self.input_shape, self.masks = model, tuple(example.shape[1:]), None
        training = model.training
        try:
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        except Exception as e:
            raise crl.CRLError(f"Torch-Pruning cannot trace {type(model).__name__} ({type(e).__name__}: "
                               f"{crl.first_line(e)})") from None
        model.train(training)
        names = {m: n for n, m in model.named_modules()}
        ignored = [output_layer(model, example), *ignored]
        model.train(training)
        self.groups, self.group_names, self.widths, self.skipped, hooks = [], [], [], {}, {}
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS):
            root = group[0].dep.target.module
            width = len(group[0].idxs)
            items = [(item.dep.target.module, item.idxs, item.root_idxs) for item in group
                     if graph.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module,
                                                                                         nn.Module)
                     and item.dep.target.module in names]
            partial = [names.get(item.dep.target.module, '?') for item in group
                       if sorted(set(item.root_idxs)) != list(range(width))]
            if width < 2 or partial:
                self.skipped[names[root]] = 'one channel' if width < 2 else f"reaches {partial[0]} in part"
                continue
            g = len(self.groups)
            self.groups.append(names[root])
            self.group_names.append(names[root])
            self.widths.append(width)
            for module, idxs, root_idxs in items:  # module channel idxs[i] is the group's channel root_idxs[i]
                hooks[module] = (g, torch.tensor(idxs), torch.tensor(root_idxs))
        if not self.groups:
            raise crl.CRLError(f"Torch-Pruning finds no prunable channel group in {type(model).__name__}")
        self.graph_modules = names
        self.hooks = [bn.register_forward_hook(self.bn_hook) for bn in model.modules()  # first: the masks apply
                      if isinstance(bn, nn.modules.batchnorm._BatchNorm)]            # to what BN computes
        offsets = [sum(self.widths[:g]) for g in range(len(self.widths))]
        for module, (g, idxs, root_idxs) in hooks.items():  # output channel c reads column index[c] of the masks
            index = torch.empty(len(idxs), dtype=torch.long).index_copy_(0, idxs, offsets[g] + root_idxs)
            self.hooks.append(module.register_forward_hook(self.mask_hook(index)))

    def remove(self):
        """Take this wrapper's hooks off the model."""
        for h in self.hooks:
            h.remove()

    def plain_copy(self):
        """A copy of the traced model without this wrapper's hooks."""
        ids = {h.id for h in self.hooks}
        hooks = [(m, m._forward_hooks) for m in self.model.modules()]
        for m, h in hooks:  # detached while copying, so that the copy does not hold this wrapper
            m._forward_hooks = type(h)((k, v) for k, v in h.items() if k not in ids)
        try:
            return copy.deepcopy(self.model)
        finally:
            for m, h in hooks:
                m._forward_hooks = h

    def mask_hook(self, index):
        """Slice k of the batch keeps the channels of mask k, as in crl_prune.Unit."""
        def hook(module, inputs, output):
            if self.masks is None:
                return output
            m = self.masks[:, index.to(output.device)].to(output.dtype)  # (K, channels)
            shape = (len(m), 1, -1, *[1] * (output.dim() - 2))
            return (output.view(len(m), -1, *output.shape[1:]) * m.view(shape)).flatten(0, 1)
        return hook

    def bn_hook(self, bn, inputs, output):
        """In training with K masks: each slice normalised with its own statistics (the running ones were updated
        over the whole batch; nothing reads them before the compact network's are measured afresh)."""
        if self.masks is None or len(self.masks) < 2 or not bn.training:
            return output
        return crl.batch_norm_per_slice(bn, inputs[0], len(self.masks), update=False).to(output.dtype)

    def forward(self, x, masks=None):
        self.masks = None if masks is None else torch.cat(list(masks), 1)  # (K, all channels), group after group
        try:
            return self.model(x)
        finally:
            self.masks = None

    # --- 3. compaction ---
    def compact(self, masks):
        """A copy of the traced model with the channels where `masks` (one 0/1 vector per group) is 0 removed by
        Torch-Pruning. In eval mode it computes what this network computes under those masks."""
        small = self.plain_copy()
        graph = tp.DependencyGraph().build_dependency(small, example_inputs=torch.zeros(
            1, *self.input_shape, device=next(small.parameters()).device), verbose=False)
        modules = dict(small.named_modules())
        for name, m in zip(self.groups, masks):
            drop = (m == 0).nonzero().flatten().tolist()
            if drop:
                root = modules[name]
                fn = graph.get_pruner_of_module(root).prune_out_channels
                graph.get_pruning_group(root, fn, drop).prune()
        return small

    def shrink(self, widths):
        """The traced model cut to `widths` channels per group (the first ones)."""
        return self.compact([torch.arange(w) < k for w, k in zip(self.widths, widths)])


# --- 2. Costs: every tensor's sizes as affine functions of the kept widths -------------------------------------------

def forms(traced):
    """{'params', 'macs', 'activations'}: (groups + 1)^2 matrices M with count(w) = w'^T M w', w' = (1, w), exact.
    Every dim of every parameter is an affine function of the kept widths: its dense size less, for each group,
    what removing one channel of the group removes from it (read off by removing channel 0 of each group in turn,
    with Torch-Pruning), times the channels removed. A tensor has at most two such dims (a weight's output and input
    channels), so parameters and MACs (weight elements x output positions) are quadratic, as in
    crl_prune.make_costs; activations (output channels x positions of every conv and linear layer) are linear.
    Checked once against a compacted network."""
    g = len(traced.widths)
    positions = {traced.graph_modules[m]: n for m, n in crl.output_positions(traced.model, traced.input_shape).items()}
    probe = traced.plain_copy()
    graph = tp.DependencyGraph().build_dependency(probe, example_inputs=torch.zeros(
        1, *traced.input_shape, device=next(probe.parameters()).device), verbose=False)
    modules = dict(probe.named_modules())
    shapes = [{n: torch.tensor(p.shape) for n, p in probe.named_parameters()}]
    for name in traced.groups:
        root = modules[name]
        graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, [0]).prune()
        shapes.append({n: torch.tensor(p.shape) for n, p in probe.named_parameters()})
    m = {name: torch.zeros(g + 1, g + 1, dtype=torch.float64) for name in (*crl.COSTS, 'activations')}
    dense = torch.tensor(traced.widths)
    e0 = torch.eye(g + 1, dtype=torch.float64)[0]
    for name, shape in shapes[0].items():
        per_channel = torch.stack([before[name] - after[name] for before, after in zip(shapes, shapes[1:])], 1)
        affine = torch.cat([(shape - per_channel @ dense)[:, None], per_channel], 1).double()  # size = affine . w'
        varying = affine[:, 1:].abs().sum(1) > 0
        if varying.sum() > 2:
            raise crl.CRLError(f"{name}: more than two of its dims follow pruned channels; its count is not quadratic")
        a, b = (list(affine[varying]) + [e0, e0])[:2]
        outer = affine[~varying, 0].prod() * torch.outer(a, b)
        m['params'] += outer
        layer = name.rpartition('.')[0]
        if name.endswith('.weight') and layer in positions:
            m['macs'] += outer * positions[layer]
            m['activations'] += torch.outer(e0, affine[0]) * positions[layer]
    probe_masks = [torch.arange(w) % 2 == 0 for w in traced.widths]
    kept = torch.stack([p.sum() for p in probe_masks])
    counted = crl.count(traced.compact(probe_masks), traced.input_shape)
    if counted != tuple(evaluate(kept, m[n]).item() for n in crl.COSTS):
        raise crl.CRLError(f"a compacted {type(traced.model).__name__} counts {counted}, not what its groups predict "
                           f"(grouped convolutions?); it cannot be pruned by width here")
    return m


def evaluate(widths, m):
    """w'^T M w' for (..., groups) widths."""
    w = torch.cat([torch.ones_like(widths[..., :1]), widths], -1).to(m)
    return torch.einsum('...i,ij,...j->...', w, m, w)


def fraction(m, dense):
    """C(widths) -> the count of `m` as a fraction of the dense network's."""
    total, on = evaluate(torch.tensor(dense), m).item(), {}
    return lambda widths: evaluate(widths, on.setdefault(widths.device, m.to(widths.device))) / total


def make_costs(traced, names=crl.COSTS):
    """{name: C(widths) -> fraction of the dense network} for 'params' and 'macs', exact (`forms`)."""
    m = forms(traced)
    return {name: fraction(m[name], traced.widths) for name in names}


class FittedLatency:
    """The latency cost of a traced network: predicted latency a * MACs + c * activations + b (ms; MACs and
    activations exact functions of the widths), fit by least squares to whole networks timed on the target device,
    over the dense network's prediction. A fit with a negative coefficient or R^2 under 0.5 is reported as
    degenerate and replaced by MACs alone. crl_prune.Latency's interface: the final mask is found by timing."""

    def __init__(self, table, numerics, forms):
        self.table, self.numerics, self.forms, self.dense_ms = table, numerics, forms, table['dense_ms']
        self.dense_predicted_ms = self.predict_ms(torch.tensor([table['meta']['widths']])).item()

    def predict_ms(self, widths):
        a, c, b = self.table['coef']
        return a * evaluate(widths, self.forms['macs'].to(widths.device)) / 1e9 + c * evaluate(
            widths, self.forms['activations'].to(widths.device)) / 1e6 + b

    def __call__(self, widths):
        return self.predict_ms(widths) / self.dense_predicted_ms

    def measure_ms(self, *models, rounds=3):
        return crl.Latency.measure_ms(self, *models, rounds=rounds)


# --- 4. The network crl_prune's command line prunes -----------------------------------------------------------------

def build(arch, classes, input_shape):
    """torchvision:NAME as torchvision builds it, randomly initialised, for `classes` classes. A ResNet, whose 7x7
    stride-2 stem and max-pool are made for 224-pixel images, gets the CIFAR stem for inputs of 64 pixels or fewer
    (a 3x3 stride-1 convolution, no max-pool), as CIFAR ResNets are built."""
    import torchvision
    model = torchvision.models.get_model(arch.partition(':')[2], weights=None, num_classes=classes)
    if isinstance(model, torchvision.models.ResNet) and max(input_shape[1:]) <= 64:
        model.conv1 = nn.Conv2d(input_shape[0], model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


class TracedNetwork:
    """What crl_prune's pipeline asks of the network it prunes (crl_prune.Network's interface), for a torchvision
    model (`arch` torchvision:NAME) or any `model` given."""

    def __init__(self, arch, classes, input_shape, model=None, ignored=()):
        self.arch, self.classes, self.input_shape = arch, classes, tuple(input_shape)
        self.plain = build(arch, classes, input_shape) if model is None else model
        self.model = Traced(self.plain, torch.zeros(1, *self.input_shape), ignored)
        self.widths, self.names = self.model.widths, self.model.group_names
        self.forms = None

    def costs(self, names):
        self.forms = self.forms or forms(self.model)
        return {name: fraction(self.forms[name], self.widths) for name in names}

    def compact(self, masks):
        return self.model.compact(masks)

    def shrink(self, widths):
        return self.model.shrink(widths)

    def fresh(self, widths):
        """A randomly initialised network of these widths (--reinit)."""
        small = self.shrink(widths)
        for m in small.modules():
            if hasattr(m, 'reset_parameters'):
                m.reset_parameters()
        return small

    def latency_table(self, numerics, batch):
        """Whole networks at eight widths (the dense one, uniformly thinned ones, random ones) timed in turns, and
        the fit of `FittedLatency` to them."""
        self.forms = self.forms or forms(self.model)
        dense = torch.tensor(self.widths)
        keep = torch.cat([torch.tensor([[1.0], [0.6], [0.3], [0.1]]).expand(4, len(dense)),
                          torch.rand(4, len(dense), generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1])
        widths = (dense * keep).round().clamp(min=1).long()
        nets = [numerics.place(self.shrink(w.tolist()).eval()) for w in widths]
        measured = torch.tensor(crl.time_in_turns(nets, numerics.random_input(batch, self.input_shape), numerics,
                                                  rounds=2, repeats=5)[0], dtype=torch.float64)
        x = torch.stack([evaluate(widths, self.forms['macs']) / 1e9, evaluate(widths, self.forms['activations']) / 1e6,
                         torch.ones(len(widths), dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(x, measured[:, None]).solution.flatten()
        r2 = 1 - ((measured - x @ coef) ** 2).sum() / ((measured - measured.mean()) ** 2).sum().clamp(min=1e-12)
        fit = {'coef': coef.tolist(), 'r2': r2.item(), 'degenerate': bool((coef[:2] < 0).any() or r2 < 0.5)}
        if fit['degenerate']:
            fit['note'] = (f"the fit of whole-network timings was degenerate (coefficients {fit['coef']}, R^2="
                           f"{fit['r2']:.2f}); MACs alone predict latency")
        return {'coef': [1.0, 0.0, 0.0] if fit['degenerate'] else fit['coef'], 'fit': fit,
                'dense_ms': measured[0].item(), 'units': []}

    def latency(self, table, numerics):
        self.forms = self.forms or forms(self.model)
        return FittedLatency(table, numerics, self.forms)


# --- 5. prune_network: the library call -------------------------------------------------------------------------------

def prune_network(model, batches, budget, *, example=None, ignored=(), costs=None, prune_epochs=10, prune_lr=0.02,
                  finetune_epochs=10, lr=0.1, finetune_batches=None, multiple=1, bf16=False, callback=None,
                  **options):
    """crl_prune.prune_network for an unmodified network: `model` is traced at `example` (default: the first image
    of `batches`); `ignored`: layers whose output channels must stay (the classifier's always do). The other
    arguments are crl_prune.prune_network's. Returns the compact network, a copy of `model` with channels removed."""
    example = next(iter(batches))[0][:1] if example is None else example
    traced = Traced(model, example, ignored)
    try:
        costs = {**make_costs(traced, [n for n in budget if n in crl.COSTS]), **(costs or {})}
        costs, fractions = crl.checked_budget(budget, costs, traced.widths, multiple)
        policy = crl.Policy(traced.widths, options.pop('init_keep', 0.9))
        policy, _ = crl.prune(traced, costs, fractions, batches, prune_epochs, lr=prune_lr, policy=policy, bf16=bf16,
                              callback=callback, **options)
        small = traced.compact(policy.split(crl.final_mask(policy, costs, fractions, multiple)))
    finally:
        traced.remove()
    crl.recalibrate_bn(small, batches, bf16=bf16)
    return crl.train(small, finetune_batches or batches, finetune_epochs, lr, bf16=bf16, phase='finetune',
                     callback=callback)


def save_pruned(small, path, model, input_shape=(3, 32, 32), **info):
    """crl_prune.save_pruned for a network `prune_network` returned: `model` is the dense network it came from (its
    groups name the kept widths). info: mean, std, classes, ... as crl_prune.save_pruned takes them."""
    traced = Traced(model, torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    traced.remove()
    widths = [small.get_submodule(name).weight.shape[0] for name in traced.groups]  # a group's root layer
    crl.save_pruned(small, path, input_shape=input_shape, widths=widths, group_names=traced.group_names, **info)


def load_pruned(path, model, device='cpu'):
    """A network saved by crl_prune.save_pruned from a traced network, into `model`, an instance of its dense form
    (any weights): cut to the saved widths, then the saved weights loaded. Returns it in eval mode, and its info."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    net = TracedNetwork(None, None, ckpt['input_shape'], model=model.to(device)).shrink(ckpt['widths'])
    net.load_state_dict(ckpt['state_dict'])
    return net.eval(), {k: v for k, v in ckpt.items() if k != 'state_dict'}
