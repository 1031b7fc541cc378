"""crl_tp.py: CRL on any convolutional network, its channel groups found by Torch-Pruning's dependency graph.

    pip install -r requirements-extras.txt          # torch-pruning (crl_prune.py itself needs torch only)
    python crl_prune.py --arch torchvision:mobilenet_v2 --data DIR --budget params=0.3
    small = crl_tp.prune_network(torchvision.models.resnet18(num_classes=10), batches, {'params': 0.3})

crl_prune.py prunes networks written with its Unit layers. This module takes an unmodified nn.Module instead:
Torch-Pruning traces it from an example input and finds its coupled channel groups (the channels a residual addition
sums, a depthwise convolution and its input, a concatenation's parts), and those become CRL's groups. Everything
else is crl_prune's own, unchanged: the policy, REINFORCE with the leave-one-out baseline, the dual step, the final
mask, the loops. This module adds what a traced network needs:
  1. Traced         the groups; the K masks of a pruning step applied by forward hooks, only while a masked forward
                    runs (slice k of the batch under mask k, a masked channel exactly zero, BN statistics per slice);
                    the user's class and model untouched; compaction by Torch-Pruning
  2. costs          parameters and MACs of any kept widths, exactly: every tensor's sizes as affine functions of the
                    widths, read off by removing one channel of each group, so the counts are quadratic forms;
                    latency predicted from MACs and activations fit to timed networks (the final mask is timed)
  3. TracedNetwork  crl_prune.Prunable for a traced network: what the method's stages and the command line ask of a
                    network (--arch torchvision:NAME; crl_prune reaches this module through crl_prune.plugin alone)
  4. prune_network  the library call, and save_pruned (crl_prune.load_pruned loads, given the dense network)
"""
import copy
import functools

import torch
import torch.nn as nn
import torch_pruning as tp

import crl_prune as crl

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# --- 1. Traced: the groups, masks through forward hooks, compaction ---------------------------------------------------

def example_for(model, input_shape):
    return torch.zeros(1, *input_shape, device=next(model.parameters()).device)


def graph_of(model, example):
    """Torch-Pruning's dependency graph of `model` (which stays in the mode it was in), or one line saying why not."""
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():  # it traces through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as e:
        raise crl.CRLError(f"Torch-Pruning cannot trace {type(model).__name__} ({type(e).__name__}: "
                           f"{crl.first_line(e)})") from None
    finally:
        for m, mode in modes.items():
            m.training = mode


def remove_channels(graph, root, idxs):
    """Remove channels `idxs` of the group whose root layer is `root`, with everything coupled to them."""
    graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs).prune()


def channel_dim(module, output, channels):
    """Where `module` puts its `channels` output channels: last for a linear layer (on (N, ..., C) tensors, as in a
    ConvNeXt block), else dim 1 where they fit there, else last (a LayerNorm over channels-last tensors)."""
    if isinstance(module, nn.Linear) or output.shape[1] != channels:
        return output.dim() - 1
    return 1


@torch.no_grad()
def outputs_of(model, example):
    """{module: its output} of one eval-mode forward pass, and the network's output."""
    outputs, modes = {}, {m: m.training for m in model.modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for m in model.modules()]
    try:
        out = model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return outputs, out


class Traced(nn.Module):
    """`model`, unmodified, with CRL's masks: forward(x, masks=None) as crl_prune's loops call it. Groups: the
    prunable channel groups Torch-Pruning finds when it traces `model` at `example`, less those that reach the output
    layer (the classifier's outputs stay) or an `ignored` layer, those of one channel, and those whose channels
    cannot be counted by width alone (part of the group's channels sent elsewhere by a split or slice): `skipped`
    says which and why. `names` are the groups' root layers."""

    def __init__(self, model, example, ignored=()):
        super().__init__()
        self.model, self.input_shape, self.masks = model, tuple(example.shape[1:]), None
        graph = graph_of(model, example)
        outputs, out = outputs_of(model, example)
        layers = [m for m in outputs if isinstance(m, LAYERS)]  # in the order they ran
        output_layer = [m for m in layers if outputs[m] is out] or layers[-1:]
        layer_names = {m: n for n, m in model.named_modules()}
        self.names, self.widths, self.skipped, columns, dims = [], [], {}, {}, {}
        for group in graph.get_all_groups(ignored_layers=[*output_layer, *ignored], root_module_types=LAYERS):
            root, width = group[0].dep.target.module, len(group[0].idxs)
            partial = [layer_names.get(i.dep.target.module, '?') for i in group
                       if sorted(set(i.root_idxs)) != list(range(width))]
            if width < 2 or partial:
                self.skipped[layer_names[root]] = 'one channel' if width < 2 else f"reaches {partial[0]} in part"
                continue
            offset = sum(self.widths)
            self.names.append(layer_names[root])
            self.widths.append(width)
            for item in group:  # a layer's output channel idxs[i] is the group's channel root_idxs[i]
                module = item.dep.target.module
                if graph.is_out_channel_pruning_fn(item.dep.handler) and module in layer_names:
                    channels = graph.get_out_channels(module)
                    dims[module] = channel_dim(module, outputs[module], channels)
                    column = columns.setdefault(module, torch.full((channels,), -1))
                    column[torch.tensor(item.idxs)] = offset + torch.tensor(item.root_idxs)
        if not self.names:
            raise crl.CRLError(f"Torch-Pruning finds no prunable channel group in {type(model).__name__}")
        for column in columns.values():  # channels of no group read the last column of the masks: a column of ones
            column[column < 0] = sum(self.widths)
        self.columns, self.dims, self.layer_names, self.on_device = columns, dims, layer_names, {}
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, x, masks=None):
        """The model's output, slice k of the batch under mask k of `masks` (one (K, width) tensor per group)."""
        if masks is None:
            return self.model(x)
        self.masks = torch.cat([*masks, torch.ones_like(masks[0][:, :1])], 1)  # (K, all channels + 1)
        if x.device not in self.on_device:  # the mask columns, copied to each device once
            self.on_device[x.device] = {m: c.to(x.device) for m, c in self.columns.items()}
        columns = self.on_device[x.device]
        hooks = [m.register_forward_hook(self.per_slice_bn) for m in self.bns]  # first: the masks zero what BN computes
        hooks += [m.register_forward_hook(functools.partial(self.mask, column=c, dim=self.dims[m]))
                  for m, c in columns.items()]
        try:
            return self.model(x)
        finally:
            for h in hooks:
                h.remove()
            self.masks = None

    def mask(self, module, inputs, output, column, dim):
        """As crl_prune.Unit does: slice k of the batch keeps the channels of mask k (on dim `dim` of the output)."""
        m = self.masks[:, column].to(output.dtype)  # (K, channels)
        shape = [len(m), 1] + [1] * (output.dim() - 1)
        shape[1 + dim] = -1
        return (output.view(len(m), -1, *output.shape[1:]) * m.view(shape)).flatten(0, 1)

    def per_slice_bn(self, bn, inputs, output):
        """In training with K > 1 masks: each slice normalised with its own statistics (the running ones were
        updated over the whole batch; nothing reads them before the compact network's are measured afresh)."""
        if len(self.masks) < 2 or not bn.training:
            return output
        return crl.batch_norm_per_slice(bn, inputs[0], len(self.masks), update=False).to(output.dtype)

    def copy_with_graph(self):
        """A copy of the model, its dependency graph and its modules by name."""
        small = copy.deepcopy(self.model)
        return small, graph_of(small, example_for(small, self.input_shape)), dict(small.named_modules())

    def compact(self, masks):
        """A copy of the model with the channels where `masks` (one 0/1 vector per group) is 0 removed by
        Torch-Pruning. In eval mode it computes what this network computes under those masks."""
        small, graph, modules = self.copy_with_graph()
        for name, m in zip(self.names, masks):
            drop = (m == 0).nonzero().flatten().tolist()
            if drop:
                remove_channels(graph, modules[name], drop)
        return small


# --- 2. Costs: every tensor's sizes as affine functions of the kept widths -------------------------------------------

def forms(traced):
    """{'params', 'macs', 'activations'}: (groups + 1)^2 matrices M with count(w) = w'^T M w', w' = (1, w), exact.
    Every dim of every parameter is an affine function of the kept widths: its dense size less, for each group,
    what removing one channel of the group removes from it (read off by removing channel 0 of each group in turn,
    with Torch-Pruning), times the channels removed. A tensor has at most two such dims (a weight's output and input
    channels), so parameters and MACs (weight elements x output positions) are quadratic, as in
    crl_prune.make_costs; activations (output channels x positions of every conv and linear layer) are linear.
    Checked once against a compacted network: its counts, and its outputs against the masked network's."""
    g = len(traced.widths)
    positions = {traced.layer_names[m]: n for m, n in crl.output_positions(traced.model, traced.input_shape).items()}
    probe, graph, modules = traced.copy_with_graph()
    shapes = [{n: torch.tensor(p.shape) for n, p in probe.named_parameters()}]
    for name in traced.names:
        remove_channels(graph, modules[name], [0])
        shapes.append({n: torch.tensor(p.shape) for n, p in probe.named_parameters()})
    m = {name: torch.zeros(g + 1, g + 1, dtype=torch.float64) for name in (*crl.COSTS, 'activations')}
    dense, e0 = torch.tensor(traced.widths), torch.eye(g + 1, dtype=torch.float64)[0]
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
    check(traced, m)
    return m


@torch.no_grad()
def check(traced, m):
    """The network compacted to every other channel has the counts the forms predict, and computes in eval mode what
    the masked network does; else the network cannot be pruned by width here (grouped convolutions, say)."""
    masks = [torch.arange(w) % 2 == 0 for w in traced.widths]
    small = traced.compact(masks)
    counted = crl.count(small, traced.input_shape)
    predicted = tuple(crl.quadratic(torch.stack([k.sum() for k in masks]), m[n]).item() for n in crl.COSTS)
    x = torch.randn(2, *traced.input_shape, device=next(small.parameters()).device)
    modes = {mod: mod.training for mod in traced.model.modules()}
    try:
        masked = traced.eval()(x, [k[None].float().to(x.device) for k in masks])
        same = torch.allclose(small.eval()(x), masked, rtol=1e-3, atol=1e-4 * max(masked.abs().max().item(), 1))
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    if counted != predicted or not same:
        what = f"counts {counted}, not {predicted}," if counted != predicted else "computes other outputs than"
        raise crl.CRLError(f"a compacted {type(traced.model).__name__} {what} what its groups predict (grouped "
                           f"convolutions, or a normalisation across channels such as LayerNorm?); it cannot be "
                           f"pruned by width here")


def make_costs(traced, names=crl.COSTS, m=None):
    """{name: C(widths) -> fraction of the dense network} for 'params' and 'macs', exact (`forms`)."""
    m = m or forms(traced)
    return {name: crl.fraction_of(m[name], traced.widths) for name in names}


class FittedLatency(crl.LatencyCost):
    """The latency cost of a traced network: predicted latency a * GMACs + c * M activations + b (ms), MACs and
    activations exact functions of the widths, fit to whole networks timed on the target device (crl_prune.calibrate;
    a degenerate fit is replaced by MACs alone). The final mask under a latency budget is found by timing."""

    def __init__(self, table, numerics, m):
        self.m = m
        super().__init__(table, numerics)

    def predict_ms(self, widths):
        self.m = {n: m.to(widths.device) for n, m in self.m.items()}  # kept where the widths are: moved once
        return sum(c * crl.quadratic(widths, self.m[n]) / s for c, (n, s) in zip(
            self.table['coef'], (('macs', 1e9), ('activations', 1e6)))) + self.table['coef'][2]


# --- 3. The network crl_prune's command line prunes ------------------------------------------------------------------

def build(arch, classes, input_shape, weights=None, cifar_stem=None):
    """torchvision:NAME as torchvision builds it for `classes` classes, randomly initialised or from `weights` (a
    state dict in torchvision's format: everything but the classifier, which is new where its number of classes
    differs). A randomly initialised ResNet, whose 7x7 stride-2 stem and max-pool are made for 224-pixel images, gets
    the CIFAR stem for CIFAR's 32-pixel images (a 3x3 stride-1 convolution, no max-pool), as CIFAR ResNets are
    built; at larger sizes every model keeps its own strides. `cifar_stem` says which (None: as just said); it is
    saved with the network (`model.cifar_stem`), so that a saved one is rebuilt as it was."""
    import torchvision
    model = torchvision.models.get_model(arch.partition(':')[2], weights=None, num_classes=classes)
    if cifar_stem is None:
        cifar_stem = weights is None and isinstance(model, torchvision.models.ResNet) and max(input_shape[1:]) <= 32
    if cifar_stem:
        model.conv1 = nn.Conv2d(input_shape[0], model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    if weights is not None:
        load_weights(model, weights, arch)
    model.cifar_stem = cifar_stem
    crl.check_input_size(model, input_shape, arch)
    return model


def load_weights(model, weights, arch):
    """`weights` into `model`, all but the last linear layer's where its shapes differ (another number of classes:
    that classifier stays newly initialised); anything else that does not fit is a one-line error."""
    own = model.state_dict()
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    keep = {k: v for k, v in weights.items()
            if not (k in own and own[k].shape != v.shape and k.rpartition('.')[0] in head)}
    wrong = sorted(set(own) ^ set(weights)) or [k for k in keep if own[k].shape != keep[k].shape]
    if wrong:
        raise crl.CRLError(f"the pretrained weights do not fit {arch}: {wrong[0]} "
                           + ('differs in shape' if wrong[0] in own and wrong[0] in weights else 'is not in both'))
    model.load_state_dict(keep, strict=False)


class TracedNetwork(crl.Prunable):
    """crl_prune.Prunable for a torchvision model (`arch` torchvision:NAME) or any `model` given: what the method's
    stages and crl_prune's command line ask of the network they prune. `model` is the `Traced` network (masks by
    hooks), `plain` the unmodified one; shrinking and fresh copies are Prunable's own, through `compact`."""

    def __init__(self, arch, classes, input_shape, model=None, ignored=(), weights=None, cifar_stem=None):
        self.arch, self.classes, self.input_shape = arch, classes, tuple(input_shape)
        self.plain = build(arch, classes, input_shape, weights, cifar_stem) if model is None else model
        try:
            self.model = Traced(self.plain, example_for(self.plain, input_shape), ignored)
        except crl.CRLError:
            raise
        except Exception as e:  # a layer or an operation Torch-Pruning or the masks do not handle
            raise crl.CRLError(f"{type(self.plain).__name__} cannot be pruned through its traced channel groups "
                               f"({type(e).__name__}: {crl.first_line(e)})") from None
        self.widths, self.names = self.model.widths, self.model.names
        self.notes = [f"the channels of {name} stay ({why})" for name, why in self.model.skipped.items()]

    @functools.cached_property
    def forms(self):
        try:
            return forms(self.model)
        except crl.CRLError:
            raise
        except Exception as e:
            raise crl.CRLError(f"{type(self.plain).__name__}: its costs cannot be read off its traced groups "
                               f"({type(e).__name__}: {crl.first_line(e)})") from None

    def costs(self, names):
        return make_costs(self.model, names, self.forms) if names else {}

    def compact(self, masks):
        return self.model.compact(masks)

    def latency_table(self, numerics, batch):
        """Whole networks at `crl_prune.calibration_widths` timed in turns, and the fit of `FittedLatency`."""
        widths = crl.calibration_widths(self.widths)
        nets = [numerics.place(self.shrink(w.tolist()).eval()) for w in widths]
        features = torch.stack([crl.quadratic(widths, self.forms['macs']) / 1e9,
                                crl.quadratic(widths, self.forms['activations']) / 1e6,
                                torch.ones(len(widths), dtype=torch.float64)], 1)
        return crl.calibrate(nets, features, numerics.random_input(batch, self.input_shape), numerics)

    def latency(self, table, numerics):
        return FittedLatency(table, numerics, self.forms)


# --- 4. prune_network: the library call -------------------------------------------------------------------------------

def prune_network(model, batches, budget, *, example=None, ignored=(), costs=None, **options):
    """crl_prune.prune_network for an unmodified network: `model` is traced at `example` (default: the first image
    of `batches`); `ignored`: layers whose output channels must stay (the classifier's always do); the other
    arguments are crl_prune.prune_network's. Returns the compact network, a copy of `model` with channels removed
    (`model` keeps its shape, not its weights: they trained while pruning)."""
    shape = (next(iter(batches))[0] if example is None else example).shape[1:]
    net = TracedNetwork(getattr(model, 'arch', None), getattr(model, 'num_classes', None), shape, model, ignored)
    return crl.prune_network(net, batches, budget, costs=costs, **options)


def save_pruned(small, path, model, input_shape=(3, 32, 32), **info):
    """crl_prune.save_pruned for a network `prune_network` returned: `model` is the dense network it came from (its
    groups name the kept widths); info: mean, std, classes, ... as crl_prune.save_pruned takes them. Load it with
    crl_prune.load_pruned(path, model=<the dense network>)."""
    traced = Traced(model, example_for(model, input_shape))
    widths = [small.get_submodule(name).weight.shape[0] for name in traced.names]  # a group's root layer
    crl.save_pruned(small, path, input_shape=input_shape, widths=widths, group_names=traced.names, **info)
