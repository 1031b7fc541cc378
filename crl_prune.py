"""crl_prune.py: neural network pruning through constrained reinforcement learning, in one file.

Reference implementation of Malik, Haider, Iqbal and Taj, "Neural Network Pruning Through Constrained
Reinforcement Learning", ICPR 2022 (arXiv:2110.08558).

    python crl_prune.py --arch vgg16 --budget params=0.1                        # the command line (Part II)
    small = crl_prune.prune_network(model, batches, {'params': 0.1})           # the library call (Part I)

The pruning decision is a policy, one Bernoulli keep-probability per channel, p = sigmoid(theta). A mask m drawn
from it selects a sub-network. The policy is trained with REINFORCE to maximise the sub-network's reward R(m)
(minus its cross-entropy) under budgets C_j(m) <= b_j on costs that are only ever *evaluated* (parameters, MACs,
measured latency, any function of the kept widths), enforced by Lagrange multipliers lambda_j >= 0 (dual ascent):

    max_theta  min_{lambda >= 0}  E_{m ~ pi_theta} [ R(m) - sum_j lambda_j (C_j(m) - b_j) ]

Meanwhile the weights keep training on the sampled sub-networks. At the end the most probable channels that fit
the budget are kept, the network is physically compacted and fine-tuned.

PART I, THE METHOD: self-contained; stop reading at its end and you have all of CRL, ready to copy.
  1. Masked networks      Unit: a conv or linear layer and its BN, whose output channels a mask can zero
  2. Two worked examples  VGG and ResNet18 for CIFAR, built of Units
  3. Costs                exact parameters and MACs of any network of Units, as functions of the kept widths
  4. The policy           one Bernoulli keep-probability per channel
  5. REINFORCE            with a leave-one-out baseline, on the Lagrangian reward; the costs' control variate
  6. The dual step        projected, damped ascent on the multipliers
  7. The loops            one pruning step; the pruning loop (its budget annealed); supervised training; two
                          hooks for several processes
  8. The final mask       the most probable channels within every budget
  9. Compaction           the smaller network, same outputs
 10. The library call     Prunable (what the stages need of a network), the four stages, prune_network
PART II, THE TOOL: data, networks (built-in or torchvision through crl_tp.py), measured costs (latency), user cost
files, progress, checkpoints, saving and export, inference speed, and the command line, which runs Part I's stages
on CIFAR or an image folder at its own resolution, in memory or streamed, in one process or several (torchrun).
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# =====================================================================================================================
# PART I: THE METHOD
# =====================================================================================================================

class CRLError(ValueError):
    """Bad input, named in one line. The library raises it; the command line prints it and exits with status 1."""


# --- 1. Masked networks ----------------------------------------------------------------------------------------------
# A *group* is a set of channels that are removed together; a mask has one entry per channel of every group. Every
# prunable layer is a Unit that knows which group its output channels (`out`) and its input channels (`inp`) belong
# to; None means channels that are never pruned (the image, the class scores). That one fact drives masking here,
# counting (section 3) and compaction (section 9): dim 0 of every tensor of a unit follows its `out` group, dim 1
# its `inp` group. Channels that a residual addition sums must vanish together, so they share one group.
# Masks come as one (K, width) tensor per group: the batch is K equal slices, slice k runs sub-network k. In training,
# BatchNorm takes its statistics over each slice separately, so a sub-network's outputs (and its reward) depend on its
# own mask and images only, never on the other masks of the batch, and match what the compact network computes.

def batch_norm_per_slice(bn, y, slices, update=True):
    """Train-mode BN of `y` = K `slices` of n samples, each normalised with its own mean and variance over its n
    samples (and positions). The running statistics (if `update`) move towards the mean of the slices' statistics."""
    z = y.float().view(slices, -1, *y.shape[1:])  # (K, n, C, *positions): a view, whatever the memory format
    var, mean = torch.var_mean(z, [1, *range(3, z.dim())], correction=0, keepdim=True)  # per slice and channel
    if update and bn.track_running_stats:
        with torch.no_grad():
            n = z.numel() // (slices * z.shape[2])  # values behind each slice's statistics
            bn.running_mean.lerp_(mean.mean(0).flatten(), bn.momentum)
            bn.running_var.lerp_(var.mean(0).flatten() * n / max(n - 1, 1), bn.momentum)  # unbiased, as nn.BatchNorm
            bn.num_batches_tracked += 1
    z = (z - mean) * torch.rsqrt(var + bn.eps)
    shape = (1, 1, -1) + (1,) * (z.dim() - 3)
    return (z * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else z).flatten(0, 1)


class Unit(nn.Module):
    """conv or linear `layer` -> `bn` (a BatchNorm or nn.Identity), then the mask of group `out`: a masked channel
    outputs exactly zero. A depthwise convolution (groups = input = output channels) maps channel c to channel c, so
    its unit reads and writes one group (inp == out); other grouped convolutions cannot be pruned by channel."""

    def __init__(self, layer, bn, inp, out):
        super().__init__()
        self.layer, self.bn, self.inp, self.out = layer, bn, inp, out
        if not (isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and
                isinstance(bn, (nn.modules.batchnorm._BatchNorm, nn.Identity))):
            raise CRLError(f"a Unit is a convolution or nn.Linear, then a BatchNorm or nn.Identity; not "
                           f"{type(layer).__name__}, {type(bn).__name__}")
        conv_groups = getattr(layer, 'groups', 1)  # a convolution's own groups, not channel groups
        self.depthwise = conv_groups > 1 and conv_groups == layer.in_channels == layer.out_channels
        if conv_groups > 1 and not self.depthwise:
            raise CRLError(f"{layer}: a grouped convolution cannot lose single channels; only depthwise ones "
                           f"(groups = in = out channels) can")
        if self.depthwise and inp != out:
            raise CRLError(f"{layer}: a depthwise convolution keeps input channel c as output channel c, so its Unit "
                           f"must read and write one group (inp={inp}, out={out} given)")

    def forward(self, x, masks=None):
        y = self.layer(x)
        n_masks = 1 if masks is None else len(masks[0])
        per_slice = n_masks > 1 and self.training and isinstance(self.bn, nn.modules.batchnorm._BatchNorm)
        y = batch_norm_per_slice(self.bn, y, n_masks) if per_slice else self.bn(y)
        if masks is None or self.out is None:
            return y
        m = masks[self.out]  # (K, channels): slice k of the batch keeps the channels of mask k
        return (y.view(n_masks, -1, *y.shape[1:]) * m.view(n_masks, 1, -1, *[1] * (y.dim() - 2)).to(y.dtype)
                ).flatten(0, 1)

    def dim_groups(self, t):
        """(dim, group) pairs of one of this unit's tensors: dim 0 follows the output group, dim 1 the input group
        (not in a depthwise convolution, whose weight has one input channel per output channel)."""
        pairs = [(0, self.out)] + ([] if self.depthwise else [(1, self.inp)])
        return [(d, g) for d, g in pairs if d < t.dim() and g is not None]


def units(model):
    return [m for m in model.modules() if isinstance(m, Unit)]


def group_widths(model):
    """Channels of every group, read off the Units; a group no Unit produces, or one with two sizes, is an error."""
    if not units(model):
        raise CRLError(f"{type(model).__name__} has no crl_prune.Unit: build it of Units, or prune it with crl_tp")
    widths, produced = {}, set()
    for u in units(model):
        w = u.layer.weight
        for g, c in ((u.out, w.shape[0]), (u.inp, w.shape[1] * getattr(u.layer, 'groups', 1))):
            if g is not None and widths.setdefault(g, c) != c:
                raise CRLError(f"group {g} has {widths[g]} channels in one Unit and {c} in another ({u.layer})")
        produced.add(u.out)
    if sorted(widths) != list(range(len(widths))) or not set(widths) <= produced:
        raise CRLError(f"groups must be numbered 0..G-1 and each be some Unit's `out`; found {sorted(widths)}, "
                       f"produced {sorted(g for g in produced if g is not None)}")
    return [widths[g] for g in range(len(widths))]


# --- 2. Two worked examples: VGG and ResNet18 for 32x32 images --------------------------------------------------------

def conv_bn(widths, inp, out, stride=1, kernel=3):
    cin = 3 if inp is None else widths[inp]
    return Unit(nn.Conv2d(cin, widths[out], kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(widths[out]),
                inp, out)


VGG_CFG = {  # channels per conv layer; 'M' is a 2x2 max-pool
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'vgg19': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M'],
}


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
        x = F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1), masks))  # 32x32 input: already 1x1 here
        return self.fc2(x, masks)


class Block(nn.Module):
    """ResNet BasicBlock. conv1 has a group of its own; conv2 and the shortcut (the block's input itself when there
    is no shortcut convolution) are summed, so they share the stage's residual-stream group."""

    def __init__(self, widths, inp, mid, out, stride):
        super().__init__()
        self.conv1 = conv_bn(widths, inp, mid, stride)
        self.conv2 = conv_bn(widths, mid, out)
        self.shortcut = conv_bn(widths, inp, out, stride, kernel=1) if stride != 1 or inp != out else None

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


ARCHS = [*VGG_CFG, 'resnet18']  # the two examples' networks, by name


def dense_widths(arch, width=1.0):
    """Channels of every group of the dense network, every layer scaled by `width`."""
    base = [64, 128, 256, 512, 64, 64, 128, 128, 256, 256, 512, 512] if arch == 'resnet18' else \
        [c for c in VGG_CFG[arch] if c != 'M'] + [512]
    return [max(1, round(c * width)) for c in base]


def build(arch, widths, num_classes):
    """The built-in network `arch` with `widths` channels per group."""
    model = (ResNet18 if arch == 'resnet18' else VGG)(arch, widths, num_classes)
    model.arch, model.num_classes = arch, num_classes
    return model


# --- 3. Costs: exact functions of the kept widths ---------------------------------------------------------------------
# A cost maps the kept widths of K candidate networks, a (K, groups) tensor, to K fractions of the dense network's
# cost. The method only ever evaluates costs, never differentiates them, so any function of the kept widths plugs in
# the same way (measured latency and users' functions in Part II). Parameters count every parameter tensor of the
# network, BN and classifier included; MACs count conv and linear layers (weight elements x output positions).
COSTS = ['params', 'macs']


@torch.no_grad()
def output_positions(model, input_shape):
    """Output positions (H*W; 1 for a linear layer) of every conv and linear layer, from one input of `input_shape`."""
    sizes, modes = {}, {m: m.training for m in model.modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, o[0].numel() // m.weight.shape[0]))
             for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return sizes


def count(model, input_shape=(3, 32, 32)):
    """(parameters, MACs) counted on a network itself: the figures reported for the dense and the compact one."""
    macs = sum(m.weight.numel() * n for m, n in output_positions(model, input_shape).items())
    return sum(p.numel() for p in model.parameters()), macs


def make_costs(model, names=COSTS, input_shape=(3, 32, 32)):
    """{name: C(widths) -> fraction of the dense `model`} for 'params' and 'macs', exact for any network of Units.
    Every tensor of a unit has (its fixed dims) x (kept width of its output group) x (kept width of its input group)
    elements, so both counts are quadratic forms count(w) = w'^T M w' in w' = (1, w), one matrix M per cost (tensors
    outside Units are constants): a step's K candidates cost one einsum, exactly. Checked once on a compacted network,
    so a layer outside the Units that reads pruned channels is an error, not a wrong count."""
    widths, positions = group_widths(model), output_positions(model, input_shape)
    matrices = {name: torch.zeros(len(widths) + 1, len(widths) + 1, dtype=torch.float64) for name in COSTS}
    seen = set()
    for unit in units(model):
        for name, t in unit.named_parameters():
            dims = dict(unit.dim_groups(t))  # dim -> group: a dim that follows a group has that group's kept width
            fixed = math.prod(size for d, size in enumerate(t.shape) if d not in dims)
            i = 1 + dims[0] if 0 in dims else 0  # t has fixed * w_out * w_in, fixed * w_out or fixed elements:
            j = 1 + dims[1] if 1 in dims else 0  # index 0 of w' is the constant 1
            matrices['params'][i, j] += fixed
            if name == 'layer.weight':  # MACs: weight elements x output positions
                matrices['macs'][i, j] += fixed * positions[unit.layer]
            seen.add(id(t))
    matrices['params'][0, 0] += sum(p.numel() for p in model.parameters() if id(p) not in seen)
    matrices['macs'][0, 0] += sum(m.weight.numel() * n for m, n in positions.items() if id(m.weight) not in seen)

    probe = [torch.arange(w) % 2 == 0 for w in widths]  # every other channel kept: the counts must agree
    try:
        counted = count(compact(model, probe), input_shape)
    except RuntimeError:
        counted = 'does not run'
    if counted != tuple(quadratic(torch.stack([p.sum() for p in probe]), m).item() for m in matrices.values()):
        what = counted if isinstance(counted, str) else 'has other counts'
        raise CRLError(f"a compacted {type(model).__name__} {what}: a layer outside the Units reads pruned channels; "
                       f"make it part of a Unit")
    return {name: fraction_of(matrices[name], widths) for name in names}


def quadratic(widths, m):
    """w'^T M w' with w' = (1, w) for every row of (..., groups) kept widths: the exact count they keep."""
    w = torch.cat([torch.ones_like(widths[..., :1]), widths], -1).to(m)
    return torch.einsum('...i,ij,...j->...', w, m, w)


def fraction_of(m, dense):
    """The cost C(widths) = count(widths) / count(dense widths) of the quadratic form `m`."""
    total, on = quadratic(torch.tensor(dense), m).item(), {}  # on: a copy of M per device, made once

    def cost(widths):
        if widths.device not in on:
            on[widths.device] = m.to(widths.device)
        return quadratic(widths, on[widths.device]) / total
    return cost


# --- 4. The policy: pi_theta(m) = prod_c Bernoulli(m_c; p_c),  p = sigmoid(theta), one entry per channel -------------

class Policy(nn.Module):
    def __init__(self, widths, init_keep=0.9):
        super().__init__()
        self.widths = list(widths)
        self.theta = nn.Parameter(torch.full((sum(widths),), math.log(init_keep / (1 - init_keep))))
        # (channels, groups) one-hot matrix, row c: the group of channel c; kept widths of K masks: one product
        self.register_buffer('onehot', torch.repeat_interleave(torch.eye(len(widths)), torch.tensor(widths), 0),
                             persistent=False)

    def sample(self, n, generator=None):
        """n masks, an (n, channels) tensor of zeros and ones."""
        p = torch.sigmoid(self.theta.detach()).nan_to_num(0.5)  # NaN logits: caught at the end of the epoch
        return torch.bernoulli(p.expand(n, -1), generator=generator)

    def log_prob(self, masks):
        """log pi(m) = sum_c m_c log p_c + (1 - m_c) log(1 - p_c), one value per mask."""
        return -F.binary_cross_entropy_with_logits(self.theta.expand_as(masks), masks, reduction='none').sum(-1)

    def split(self, masks):
        """One (k, width) block per group, the form the models take."""
        return masks.split(self.widths, -1)

    def kept(self, masks):
        """Kept widths per group of each mask, the input of every cost (given keep-probabilities instead of masks:
        the expected widths, rounded)."""
        return (masks @ self.onehot).round().long()

    def expected_widths(self):
        """The expected kept widths, rounded, (1, groups)."""
        return self.kept(torch.sigmoid(self.theta.detach())[None])


def expected_cost(policy, costs):
    """Every cost at the policy's expected widths, (J,)."""
    w = policy.expected_widths()
    return torch.stack([c(w)[0] for c in costs.values()])


# --- 5. REINFORCE with a baseline on the Lagrangian reward ------------------------------------------------------------

def reinforce_loss(policy, masks, reward, cost, budget, lam, slopes=None):
    """Surrogate loss whose gradient is minus the policy gradient of the Lagrangian, for K masks.
    reward: (K,), cost: (K, J) values C_j(m_k), budget and lam: (J,); slopes: (J, groups), see `cost_slopes`."""
    exact = 0
    if slopes is not None:  # control variate (MuProp): C~(m) = slopes . kept(m), whose expectation is known exactly
        cost = cost - policy.kept(masks).to(slopes) @ slopes.T   # REINFORCE sees C - C~ only ...
        exact = (torch.sigmoid(policy.theta) @ policy.onehot).to(slopes) @ slopes.T @ lam  # ... + grad E[C~] exactly
    lagrangian = reward - (cost - budget) @ lam           # L_k = R_k - sum_j lambda_j (C_j(m_k) - b_j)
    n = len(lagrangian)
    advantage = (lagrangian - lagrangian.mean()) * n / (n - 1)  # L_k - b_k, b_k = mean of the other K-1 (unbiased)
    return -(advantage.detach().float() * policy.log_prob(masks)).mean() + exact  # -mean_k (L_k - b_k) grad log pi


def cost_slopes(policy, costs):
    """Finite-difference slopes dC_j/dw_g of every cost at the policy's expected widths, (J, groups): one channel
    fewer in each group (one more where only one is left), one call of each cost on all of them."""
    w = policy.expected_widths()                                                  # (1, groups)
    step = torch.where(w > 1, -1, 1)
    values = [c(torch.cat([w, w + torch.diag(step[0])])).double() for c in costs.values()]
    return torch.stack([(v[1:] - v[0]) / step[0] for v in values])


# --- 6. The dual step: a PI controller on the multipliers (Platt & Barr 1988; Stooke et al. 2020) ---------------------
#     e_j = (mean_k C_j(m_k) - b_j) / b_j                        the relative violation (b_j: `prune`'s annealed budget)
#     I_j <- max(0, I_j + eta clip(e_j, -1, 1))                  projected dual ascent, at most eta a step either way
#     lambda_j = max(0, I_j + damping (e_j + drift_j / b_j))     plus a push proportional to the predicted violation
# Plain ascent (lambda <- max(0, lambda + eta (C - b))) winds lambda up while a cost starts far over a small budget
# and then unwinds it by only eta b a step, so it drives the cost far under the budget. The clipped relative
# violation winds the integral down as fast as it wound up; the proportional term pushes as hard as the policy lags;
# eta 0.05 lets the integral take over, within a few epochs, the offset e_j > 0 that term alone needs to hold lambda.
# The push acts on the cost `lead` steps on, drift = lead * (the last step's change of the expected cost): Adam's
# momentum keeps the policy moving after the push stops and would carry it far under a budget reached at speed,
# where lambda is 0. Braking early lets the damping be large (100), which a network of many channels needs: lambda's
# pull on each channel's keep-probability is about lambda / channels.

def dual_step(integral, cost, budget, eta, damping, drift=0):
    """Returns the new integral term and the multipliers lambda_j = max(0, I_j + damping * e'_j), e'_j the relative
    violation of cost + drift (the cost predicted a few steps on; 0: the current one)."""
    error = (cost - budget) / budget
    integral = (integral + eta * error.clamp(-1, 1)).clamp(min=0)   # projected dual ascent on the clipped violation
    return integral, (integral + damping * (error + drift / budget)).clamp(min=0)


# --- 7. The loops -----------------------------------------------------------------------------------------------------
# Both loops report to an optional callback(event), a dict: after every step {'phase', 'epoch', 'epochs', 'step',
# 'steps', 'loss', 'logits', 'labels', 'cost' (pruning: the K sampled costs), 'objects'}, and at the end of every
# epoch the same with 'step': None. 'objects' holds what the rest of the run depends on (network, optimisers, policy,
# multipliers): a checkpoint saves them, and an optional resume(phase, objects) loads them back and returns the
# epoch to continue from. Part II builds progress lines, metrics and checkpoints on these two hooks.
# On several processes (data parallel, Part II) two more: `wrap(model)` runs the steps (DistributedDataParallel, which
# averages the weights' gradients), and `reduce(t)` averages a tensor over the processes: the K rewards, before the
# policy's update, and the BN statistics measured at the end. The processes draw the same K masks (a generator
# seeded by the step), so their policies and multipliers stay identical without ever being sent.

def pruning_step(model, policy, costs, budget, lam, x, y, opt_w, opt_p, samples=8, bf16=False, control_variate=True,
                 generator=None, reduce=None):
    """One CRL step on the images x under the multipliers `lam`: sample K masks and score all K sub-networks in one
    forward pass (slice k of the batch is the same images under mask k: common random numbers, rewards differ only
    through the masks), then update the weights (SGD on the sub-networks' mean cross-entropy, so they adapt to them)
    and the policy (REINFORCE). Returns the loss, the logits and the K sampled costs (K, J), which the dual step
    takes."""
    masks = policy.sample(samples, generator)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        logits = model(torch.cat([x] * samples), policy.split(masks))  # cat keeps channels_last
    ce = F.cross_entropy(logits.float(), y.repeat(samples), reduction='none').view(samples, -1).mean(1)
    cost = torch.stack([c(policy.kept(masks)) for c in costs.values()], 1)  # C_j(m_k), evaluated, not differentiated
    opt_w.zero_grad(set_to_none=True)
    opt_p.zero_grad(set_to_none=True)
    # two losses on disjoint parameters, one backward: the masks carry no gradient to theta, the advantage none to
    # the weights; the reward of mask k is R_k = -ce_k (its mean over the processes' images, with `reduce`)
    slopes = cost_slopes(policy, costs) if control_variate else None
    reward = -(reduce or (lambda t: t))(ce.detach())
    (ce.mean() + reinforce_loss(policy, masks, reward, cost, budget, lam, slopes)).backward()
    opt_w.step()
    opt_p.step()
    return ce.mean().detach(), logits.detach(), cost


def sgd(model, lr, weight_decay, steps):
    """SGD with Nesterov momentum and weight decay, learning rate on a cosine from `lr` to 0 over `steps`."""
    opt = torch.optim.SGD(model.parameters(), lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1)))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def prune(model, costs, budget, batches, epochs=10, *, samples=8, lr=0.02, weight_decay=5e-4, policy_lr=0.2,
          dual_lr=0.05, damping=100.0, lead=5.0, init_keep=0.9, anneal=1/6, control_variate=True, policy=None,
          bf16=False, wrap=None, reduce=None, callback=None, resume=None):
    """The pruning loop: every step of every epoch a `pruning_step` on a batch of `batches` (re-iterable, with a
    len: a list or a DataLoader of (images, labels); each batch runs K = `samples` times), then the dual step.
    costs: {name: C(widths)}, budget: fractions in the same order. Returns the policy (a new one unless given) and
    the multipliers. The loop's state, what a checkpoint saves, is the dict `state`."""
    if samples < 2:
        raise CRLError(f"samples={samples}: at least 2 masks a step (each one's baseline is the others' mean reward)")
    device = next(model.parameters()).device
    budget = torch.as_tensor(budget, dtype=torch.float64, device=device)
    policy = (policy or Policy(group_widths(model), init_keep)).to(device)
    opt_w, sched = sgd(model, lr, weight_decay, epochs * len(batches))
    opt_p = torch.optim.Adam(policy.parameters(), policy_lr)
    # the budget annealed: b_t falls geometrically from the initial policy's expected cost b_0 (where it is above b)
    # to b over the first `anneal` of the steps, b_t = b_0^(1-s) b^s with s = min(1, t / (anneal T))
    start = expected_cost(policy, costs).to(budget)
    total = max(round(anneal * epochs * len(batches)), 1)
    state = dict(model=model, policy=policy, opt_w=opt_w, opt_p=opt_p, sched=sched, start=start.maximum(budget),
                 expected=start, integral=torch.zeros_like(budget), lam=torch.zeros_like(budget),  # b_0, I_j, lambda_j
                 seed=torch.randint(2 ** 62, ()))  # the masks of step t come from a generator seeded with seed + t
    net, generator = (wrap or (lambda m: m))(model), torch.Generator(device)
    model.train()
    for epoch in range(resume('prune', state) if resume else 1, epochs + 1):
        event = dict(phase='prune', epoch=epoch, epochs=epochs, steps=len(batches), objects=state)
        for step, (x, y) in enumerate(batches, 1):
            t = (epoch - 1) * len(batches) + step  # the step's number in the whole loop
            s = min(1.0, t / total)
            target = state['start'] ** (1 - s) * budget ** s
            generator.manual_seed(state['seed'].item() + t)
            loss, logits, cost = pruning_step(net, policy, costs, target, state['lam'], x, y, opt_w, opt_p, samples,
                                              bf16, control_variate, generator, reduce)
            expected, state['expected'] = state['expected'], expected_cost(policy, costs).to(budget)  # the pace
            state['integral'], state['lam'] = dual_step(state['integral'], cost.mean(0), target, dual_lr, damping,
                                                        lead * (state['expected'] - expected))
            sched.step()
            if callback:
                callback({**event, 'step': step, 'loss': loss, 'logits': logits, 'labels': y.repeat(samples),
                          'cost': cost})
        if not (torch.isfinite(state['lam']).all() and torch.isfinite(policy.theta).all()):
            raise CRLError(f"prune epoch {epoch}: the multipliers or the policy became NaN or inf; lower the dual "
                           f"or policy learning rate or the damping")
        if callback:
            callback({**event, 'step': None})
    return policy, state['lam']


def train(model, batches, epochs, lr=0.1, *, weight_decay=5e-4, bf16=False, wrap=None, reduce=None, phase='train',
          callback=None, resume=None):
    """Supervised training of a whole network (the dense one, then the compact one), its BN statistics measured
    afresh on the final weights at the end (a short phase leaves its running averages far from them)."""
    opt, sched = sgd(model, lr, weight_decay, epochs * len(batches))
    objects = dict(model=model, opt=opt, sched=sched)
    net = (wrap or (lambda m: m))(model)
    model.train()
    for epoch in range(resume(phase, objects) if resume else 1, epochs + 1):
        event = dict(phase=phase, epoch=epoch, epochs=epochs, steps=len(batches), objects=objects)
        for step, (x, y) in enumerate(batches, 1):
            with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if callback:
                callback({**event, 'step': step, 'loss': loss.detach(), 'logits': logits.detach(), 'labels': y})
        if epoch == epochs:  # before the epoch's callback, so that a checkpoint of it holds the statistics
            recalibrate_bn(model, batches, bf16=bf16, reduce=reduce)
        if callback:
            callback({**event, 'step': None})
    return model


@torch.no_grad()
def recalibrate_bn(model, batches, n=20, bf16=False, reduce=None):
    """BN running statistics of the network itself, averaged over `n` training batches (and over the processes,
    with `reduce`): after pruning they replace the statistics that many sampled masks accumulated together in the
    dense network. The model's modes and BN momenta are left as they were."""
    bns = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    modes = {m: m.training for m in model.modules()}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    model.train()
    for _, (x, _) in zip(range(n), batches):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            model(x)
    for m, momentum in bns.items():
        m.momentum = momentum
        if reduce:
            m.running_mean.copy_(reduce(m.running_mean))
            m.running_var.copy_(reduce(m.running_var))
    for m, mode in modes.items():
        m.training = mode


# --- 8. The final mask: most probable channels first, as many as every budget allows, at least one per group ---------
# With `multiple` > 1 every group keeps a multiple of that many channels (a group narrower than that keeps all of its
# channels): a GPU's tensor cores run bf16 convolutions fast only on such widths.

def keep_top(policy, counts):
    """The mask that keeps, in every group, its counts[g] most probable channels."""
    theta = policy.theta.detach()
    m, start = torch.zeros_like(theta), 0
    for width, n in zip(policy.widths, counts):
        m[start + theta[start:start + width].topk(n).indices] = 1
        start += width
    return m


def rounded(widths, counts, multiple):
    """Kept counts per group, (..., groups), rounded down to a multiple of `multiple`, at least min(multiple, width)
    per group (a tensor)."""
    counts = torch.as_tensor(counts)
    return torch.maximum(counts - counts % multiple, torch.tensor(widths, device=counts.device).clamp(max=multiple))


def allowed(costs, budget, widths):
    """Whether each row of (N, groups) kept widths meets every budget: (N,) booleans."""
    ok = [c(widths) <= b for c, b in zip(costs.values(), budget.tolist())]
    return torch.stack(ok).all(0) if ok else torch.ones(len(widths), dtype=torch.bool)


def prefixes(policy, multiple=1):
    """Kept widths of every prefix of the ranking by keep-probability, row n: the first n channels (rounded)."""
    order = policy.theta.detach().argsort(descending=True)
    counts = torch.cat([torch.zeros_like(policy.onehot[:1]), policy.onehot[order].cumsum(0)]).round().long()
    return rounded(policy.widths, counts, multiple)


def final_mask(policy, costs, budget, multiple=1):
    """Rank channels by keep-probability and keep the longest prefix of the ranking that meets every budget (its
    counts rounded to `multiple` per group). Every prefix is evaluated at once, one call of each cost on all of them,
    so a cost that can fall when a channel is added (measured latency, a user's function) still gets the longest."""
    counts = prefixes(policy, multiple)
    ok = allowed(costs, budget, counts)
    if not ok.any():
        raise CRLError(f'the budget is below the smallest network ({multiple} channel(s) per group)')
    return keep_top(policy, counts[ok.nonzero().max()].tolist())


# --- 9. Compaction: the smaller network, same outputs -----------------------------------------------------------------

@torch.no_grad()
def compact(model, masks):
    """A copy of `model` keeping the channels where `masks` (one 0/1 vector per group) is 1: every tensor of every
    Unit sliced along the dims that follow a group, the layers' sizes updated. In eval mode it computes what `model`
    computes under those masks; any network of Units, no registry."""
    keep = [m.nonzero().squeeze(1).to(next(model.parameters()).device) for m in masks]
    small = copy.deepcopy(model)
    for u in units(small):
        for module in (u.layer, u.bn):
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                sliced = t
                for d, g in u.dim_groups(t):
                    sliced = sliced.index_select(d, keep[g])
                setattr(module, name, nn.Parameter(sliced, t.requires_grad) if isinstance(t, nn.Parameter) else sliced)
        w = u.layer.weight
        if isinstance(u.layer, nn.Linear):
            u.layer.out_features, u.layer.in_features = w.shape[:2]
        else:
            u.layer.out_channels, u.layer.in_channels = w.shape[0], w.shape[1] * u.layer.groups
            if u.depthwise:
                u.layer.groups = u.layer.in_channels = w.shape[0]
        if hasattr(u.bn, 'num_features'):
            u.bn.num_features = w.shape[0]
    return small


# --- 10. The library call: the method's stages on any prunable network -------------------------------------------
# What the stages need of a network is stated once, in `Prunable`: this class answers for a network of Units, and
# crl_tp.py's TracedNetwork for any torchvision model. A cost may also be *measured* on whole networks (latency is):
# then besides C(widths), its prediction, which steers the policy, it has `measure(small, dense)`, the fraction it
# measures, which decides the budget's feasibility, and `search(net, policy, costs, budget, multiple)`, the final
# mask found by measuring compact networks (every measured cost at once; section 8 ranks by the predictions alone).
# Part II's `MeasuredCost` gives both: subclass it. `prune_network` runs the four stages; the command line runs the
# same four, with its data, progress, checkpoints and reports around them.

class Prunable:
    """A network the method can prune. `model`: forward(x, masks=None), what the loops train and mask; `plain`: the
    network itself, as saved, counted and timed (here the same module); `widths` and `names` of its groups;
    `costs(names)`: exact params and MACs (section 3); `compact(masks)` (section 9); `shrink(widths)`: the first
    channels of each group (to time a shape, or to load weights saved from a compact network); `fresh(widths)`: a
    randomly initialised network of those widths; `notes`: what it leaves unpruned, and why. For a latency budget the
    tool (Part II) also asks `latency_table(numerics, batch)` and `latency(table, numerics)`."""

    def __init__(self, model, input_shape=(3, 32, 32)):
        self.model = self.plain = model
        self.input_shape, self.widths, self.notes = tuple(input_shape), group_widths(model), []
        self.names = list(getattr(model, 'group_names', None) or [f'group{g}' for g in range(len(self.widths))])

    def costs(self, names):
        return make_costs(self.model, names, self.input_shape) if names else {}

    def compact(self, masks):
        return compact(self.model, masks)

    def shrink(self, widths):
        if len(widths) != len(self.widths) or any(not 0 < n <= w for w, n in zip(self.widths, widths)):
            raise CRLError(f"widths {list(widths)} do not fit a network of widths {self.widths}")
        return self.compact([torch.arange(w) < n for w, n in zip(self.widths, widths)])

    def fresh(self, widths):
        small = self.shrink(widths)
        for m in small.modules():
            if hasattr(m, 'reset_parameters'):
                m.reset_parameters()
        return small


def checked_budget(budget, costs, net, multiple=1):
    """Stage 1: the costs `budget` ({name: fraction}) names, in its order, and its fractions as a tensor. A name
    without a cost, a fraction outside (0, 1] or a budget that even the smallest network breaks (measured, for a
    measured cost) is a CRLError."""
    names = list(budget)
    unknown = [n for n in names if n not in costs]
    if unknown or not names:
        raise CRLError(f"budget {budget}: no cost named {unknown or 'at all'}; give params, macs or one of `costs`")
    if not all(0 < budget[n] <= 1 for n in names):
        raise CRLError(f"budget {budget}: every value is a fraction of the dense network, in (0, 1]")
    smallest = rounded(net.widths, [1] * len(net.widths), multiple)
    for name in names:
        cost = costs[name]
        c = cost.measure(net.shrink(smallest.tolist()), net.plain) if hasattr(cost, 'measure') else \
            cost(smallest[None])[0].item()
        if c > budget[name]:
            raise CRLError(f"budget {budget}: infeasible, even {multiple} channel(s) per group cost {c:.3f} of the "
                           f"dense network's {name}" + (', measured' if hasattr(cost, 'measure') else ''))
    return {n: costs[n] for n in names}, torch.tensor([budget[n] for n in names], dtype=torch.float64)


def final_network(net, policy, costs, budget, multiple=1, batches=None, bf16=False, reduce=None):
    """Stage 3 (after stage 2, `prune`): the final mask (section 8; found by measuring, where a cost is measured),
    the compact network (section 9) and its BN statistics measured on `batches`. Returns the network and the mask.
    With `reduce` (several processes), masks that differ between the processes are an error: their mean differs."""
    measured = [c for c in costs.values() if hasattr(c, 'search')]
    mask = measured[0].search(net, policy, costs, budget, multiple) if measured else \
        final_mask(policy, costs, budget, multiple)
    if reduce is not None and not torch.equal(reduce(mask), mask):
        raise CRLError("the processes ended with different masks; their policies diverged (were the rewards "
                       "averaged over them, with the same seed in every process?)")
    small = net.compact(policy.split(mask))
    if batches is not None:
        recalibrate_bn(small, batches, bf16=bf16, reduce=reduce)
    return small, mask


def prune_network(model, batches, budget, *, costs=None, input_shape=None, prune_epochs=10, prune_lr=0.02,
                  finetune_epochs=10, lr=0.1, finetune_batches=None, multiple=1, bf16=False, callback=None,
                  init_keep=0.9, wrap=None, reduce=None, **options):
    """Prune `model` under `budget`, {cost name: fraction of the dense network in (0, 1]} (e.g. {'params': 0.1},
    {'macs': 0.3, 'energy': 0.5}); return the compact network, fine-tuned. model: a network of Units whose forward
    takes (x, masks=None), or a `Prunable` (crl_tp's, for any torchvision model). batches: re-iterable (images,
    labels) batches with a len, on the model's device (a pruning step runs its batch K times); costs: more {name:
    C(widths)}, params and macs built in; wrap, reduce: for several processes (section 7; README); options:
    `prune`'s keywords. `model`'s weights train while pruning (copy it first to keep the dense network). Bad input
    raises CRLError before any training."""
    net = model if isinstance(model, Prunable) else Prunable(model, input_shape or next(iter(batches))[0].shape[1:])
    costs = {**net.costs([n for n in budget if n in COSTS and n not in (costs or {})]), **(costs or {})}
    costs, fractions = checked_budget(budget, costs, net, multiple)                                  # stage 1
    policy, _ = prune(net.model, costs, fractions, batches, prune_epochs, lr=prune_lr, bf16=bf16,    # stage 2
                      policy=Policy(net.widths, init_keep), wrap=wrap, reduce=reduce, callback=callback, **options)
    small, _ = final_network(net, policy, costs, fractions, multiple, finetune_batches or batches, bf16,  # stage 3
                             reduce)
    return train(small, finetune_batches or batches, finetune_epochs, lr, bf16=bf16, wrap=wrap,        # stage 4
                 reduce=reduce, phase='finetune', callback=callback)


# =====================================================================================================================
# END OF PART I. What follows is the tool: data, latency, user costs, progress, checkpoints, export, command line.
# =====================================================================================================================

# =====================================================================================================================
# PART II: THE TOOL
# =====================================================================================================================
import argparse  # noqa: E402  (Part II's own imports: Part I needs none of them)
import csv  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

# 11. Data                 images at the run's size, in memory or streamed; augmentation as tensor ops; batches as
#                          Part I takes them; the few places where torchrun's processes meet
# 12. Networks             what the tool prunes: built-in networks of Units, or any torchvision model through crl_tp
# 13. Measured costs       latency: a per-unit table predicts it while pruning; feasibility and final mask timed
# 14. User cost files      --cost NAME=file.py:function
# 15. Progress, metrics and checkpoints, as callbacks of Part I's loops
# 16. Saving, loading, export and inference speed
# 17. The command line     every input checked before any long work, then Part I's stages phase by phase


def fail(message):
    raise CRLError(message)


def first_line(e):
    """An exception as one short line, for the one-line errors."""
    return (str(e).strip().splitlines() or [''])[0][:200]


# Several processes (torchrun): every process runs the whole pipeline on its shard of the data; these are the few
# places where they meet. Outside torchrun each is a no-op.

def rank_and_world():
    """This process's rank and the number of processes (0 and 1 outside torchrun)."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_reduce(t, op='mean'):
    """`t` averaged (op 'mean') or summed ('sum') over the processes, a new tensor."""
    if rank_and_world()[1] == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)  # a sum (gloo has no average)
    return t / rank_and_world()[1] if op == 'mean' else t


def barrier():
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def on_rank0(fn):
    """fn() computed by process 0 alone and sent to every process (CPU tensors, numbers): what must not differ
    between them (timings). Inside fn, on_rank0 just calls."""
    if rank_and_world()[1] == 1 or on_rank0.inside:
        return fn()
    on_rank0.inside = True
    try:
        result = [fn() if rank_and_world()[0] == 0 else None]
    finally:
        on_rank0.inside = False
    torch.distributed.broadcast_object_list(result, 0)
    return result[0]


on_rank0.inside = False


def identical(t, what):
    """Fail, in every process, where `t` is not the same in all of them (a divergence is an error, not silent)."""
    if rank_and_world()[1] > 1:
        ref = t.clone()
        torch.distributed.broadcast(ref, 0)
        if all_reduce((ref != t).any().float(), 'sum').item():
            fail(f"the processes ended with different {what}; they must stay identical (a nondeterministic cost?)")


def end_processes(synced=True):
    """Leave the process group (torchrun's, or the library caller's) at the end of a run; a no-op in one process.
    `synced` (the run ended well in every process): they first wait for one another, so that none tears down
    while another still communicates. Then the GIL is left free for a moment: a process group that DDP has held
    outlives destroy_process_group, and one of gloo's worker threads may still be letting go of the last
    collective's tensors, which takes the GIL; if Python has begun shutting down by then, the process aborts
    ("terminate called without an active exception") after a run that succeeded."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if synced:
        barrier()
    torch.distributed.destroy_process_group()
    time.sleep(0.1)


# --- 11. Data ---------------------------------------------------------------------------------------------------------
# Every image is decoded once to a `size` x `size` uint8 tensor (`decode`). Two paths bring those to the loops: the
# in-memory one holds a split as one uint8 tensor on the device (CIFAR: 150 MB; what makes the CIFAR pipeline fast),
# the streaming one decodes each batch from the image folder in a DataLoader's worker processes (data that does not
# fit). Both end in the same `Batches`: normalisation and augmentation as batched tensor ops on the device. Under
# torchrun each process takes its own shard of every pass (section 17).

class Numerics:
    """How networks run: the device, bf16 autocast (matrix products in bfloat16; losses, rewards and costs in
    float32/float64) and the channels_last memory format. 'auto' turns both on on CUDA and off elsewhere; 'on' and
    'off' force them on any device, so the CPU tests exercise the GPU path."""

    def __init__(self, device, bf16='auto', channels_last='auto'):
        pick = lambda v: device.type == 'cuda' if v == 'auto' else v in ('on', True)  # noqa: E731
        self.device, self.bf16, self.channels_last = device, pick(bf16), pick(channels_last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def place(self, model):
        """`model` on the device, in the memory format."""
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def random_input(self, batch, shape):
        """Random input of `shape` (C, H, W) or (C,), in the memory format, on the device."""
        x = torch.randn(batch, *shape, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def describe(self):
        return {'device': str(self.device), 'bf16': self.bf16, 'channels_last': self.channels_last}


def decode(path, size, resize):
    """One image as a (3, size, size) uint8 tensor: its shorter side resized to `resize` (bilinear, antialiased),
    then its centre `size` x `size` crop (images already of that size are left as they are). 16-bit grey images
    are scaled to 8 bits (PIL's RGB conversion would saturate them); an alpha channel is dropped, as torchvision's
    loader does. An unreadable file is a one-line error naming it."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith('I'):  # 16- or 32-bit integer pixels
                a = np.asarray(img).astype(np.float64)
                img = Image.fromarray((a * 255 / (65535 if a.max() > 255 else 255)).clip(0, 255).astype(np.uint8))
            img = img.convert('RGB')
            if img.size != (size, size):
                w, h = img.size
                w, h = (resize, max(round(h * resize / w), resize)) if w <= h else (max(round(w * resize / h),
                                                                                        resize), resize)
                img = img.resize((w, h), Image.BILINEAR, reducing_gap=None)
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    except OSError as e:
        fail(f"--data: cannot read image {path} ({first_line(e)})")


def resize_for(size, train):
    """The shorter side an image is resized to before its centre crop: `size` for training images (augmentation
    crops them further) and at 32 px or less (CIFAR's recipe); above 32 px, test images as torchvision's reference
    recipes evaluate them, resized to size / 0.875 (e.g. 256 for 224)."""
    return size if train or size <= 32 else round(size / 0.875)


class Folder(torch.utils.data.Dataset):
    """An ImageFolder split decoded at `size` px (what the streaming path's workers read): (uint8 image, label);
    with `subset`, that many of its images, a fixed random choice."""

    def __init__(self, root, size, train, subset=0):
        import torchvision
        ds = torchvision.datasets.ImageFolder(root)
        self.samples, self.labels, self.classes = [s[0] for s in ds.samples], torch.tensor(ds.targets), ds.classes
        self.size, self.resize = size, resize_for(size, train)
        keep = fixed_subset(len(self.samples), subset)
        if keep is not None:
            self.samples, self.labels = [self.samples[i] for i in keep.tolist()], self.labels[keep]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return decode(self.samples[i], self.size, self.resize), self.labels[i]


class InMemory:
    """A split as one uint8 tensor (N, 3, H, W) and its labels, on the device; batches by indexing."""

    def __init__(self, x, y, device):
        self.x, self.labels, self.device = x.to(device), y.to(device), device

    def __len__(self):
        return len(self.labels)

    def batches(self, index_batches):
        for idx in index_batches:
            idx = idx.to(self.device)
            yield self.x[idx], self.labels[idx]


class Streamed:
    """A split read from its image folder batch by batch: `workers` processes decode, the main one moves batches to
    the device (from pinned memory on CUDA)."""

    def __init__(self, folder, device, workers):
        self.folder, self.labels, self.device, self.workers = folder, folder.labels, device, workers

    def __len__(self):
        return len(self.labels)

    def batches(self, index_batches):
        loader = torch.utils.data.DataLoader(self.folder, batch_sampler=[i.tolist() for i in index_batches],
                                             num_workers=self.workers, pin_memory=self.device.type == 'cuda',
                                             prefetch_factor=4 if self.workers else None)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def fixed_subset(n, k):
    """Which k of the n training images --subset k keeps: the same ones in every run (None for k = 0: all)."""
    if k > n:
        fail(f"--subset {k}: the training set has only {n} images")
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k] if k else None


@functools.lru_cache(maxsize=4)  # a process that runs main() many times (bench/compare.py) decodes each folder once
def read_image_folder(root, size=32, train=True, subset=0):
    """An ImageFolder directory (its `Folder`) decoded at `size` px, as (uint8 images (N, 3, size, size), labels,
    class names), by a pool of threads (PIL releases the GIL while it decodes)."""
    from concurrent.futures import ThreadPoolExecutor
    folder = Folder(root, size, train, subset)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        x = torch.stack(list(pool.map(lambda s: decode(s, size, folder.resize), folder.samples, chunksize=256)))
    return x, folder.labels, folder.classes


def image_folder_splits(data):
    """train/ and test/ (or val/) of an ImageFolder directory and its class names, checked without reading any
    image."""
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
    return os.path.join(data, 'train'), test, classes[0]


def image_size(args):
    """(--image-size, or the data's own size, and a note where images differ in size): CIFAR's 32; for an image
    folder, the size of its images where the 64 spread through its training split share one square size, else the
    median shorter side, with a note that images are resized and centre-cropped."""
    if not args.data:
        return args.image_size or 32, None
    from PIL import Image
    import torchvision
    samples = torchvision.datasets.ImageFolder(image_folder_splits(args.data)[0]).samples
    sizes = []
    for path, _ in samples[::max(len(samples) // 64, 1)]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except OSError as e:
            fail(f"--data: cannot read image {path} ({first_line(e)})")
    size = args.image_size or (sizes[0][0] if all(s == (sizes[0][0],) * 2 for s in sizes) else
                               sorted(min(s) for s in sizes)[len(sizes) // 2])
    if all(s == (size, size) for s in sizes):
        return size, None
    seen = ', '.join(sorted({f'{w}x{h}' for w, h in sizes})[:4])
    return size, (f"images of {seen}{', ...' if len(set(sizes)) > 4 else ''} are resized (shorter side) and "
                  f"centre-cropped to {size}x{size}" + ('' if args.image_size else '; --image-size sets the size'))


def fits_in_memory(n, size, device, processes=1):
    """Whether n decoded images of `size` px fit a quarter of the device's memory (the host's free memory on the
    CPU), shared by the processes on this machine."""
    if device.type == 'cuda':
        free = torch.cuda.get_device_properties(device).total_memory
    else:
        free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / processes
    return n * 3 * size * size < free / 4


IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def load_data(args, numerics, size=32):
    """{'train': split, 'test': split, 'classes': names, 'mean': ..., 'std': ..., 'size', 'streamed', 'numerics'},
    each split an `InMemory` or `Streamed` of uint8 images at `size` px."""
    device, rank, world = numerics.device, *rank_and_world()
    if args.data:
        train_dir, test_dir, _ = image_folder_splits(args.data)
        folders = [Folder(train_dir, size, True, args.subset), Folder(test_dir, size, False)]
        streamed = args.loader == 'stream' or args.loader == 'auto' and not fits_in_memory(
            len(folders[0]) + len(folders[1]), size, device, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
        splits = [Streamed(folders[0], device, args.workers), Streamed(folders[1], device, args.workers)] if \
            streamed else [InMemory(*read_image_folder(train_dir, size, True, args.subset)[:2], device),
                           InMemory(*read_image_folder(test_dir, size, False)[:2], device)]
        classes = folders[0].classes
    else:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if args.dataset == 'cifar10' else torchvision.datasets.CIFAR100
        try:
            if rank == 0:  # one process downloads, the others wait for it
                cls(args.data_root, download=True)
            barrier()
            tr, te = (cls(args.data_root, train=t) for t in (True, False))
        except Exception as e:
            fail(f"could not download {args.dataset} into {args.data_root} ({type(e).__name__}); without internet, "
                 f"pass --data DIR, a folder of images in ImageFolder layout (train/ and test/)")
        x = [torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous() for d in (tr, te)]
        if size != 32:
            x = [F.interpolate(t.float(), size, mode='bilinear', antialias=True).round().clamp(0, 255).byte()
                 for t in x]
        y = [torch.tensor(d.targets) for d in (tr, te)]
        keep = fixed_subset(len(y[0]), args.subset)
        if keep is not None:
            x[0], y[0] = x[0][keep], y[0][keep]
        splits, streamed, classes = [InMemory(*xy, device) for xy in zip(x, y)], False, tr.classes
    if len(splits[0]) < args.batch_size * world:  # BatchNorm needs whole batches (BN1d after fc1: more than one value)
        fail(f"{len(splits[0])} training images, fewer than one batch (--batch-size {args.batch_size}"
             + (f" on each of {world} processes" if world > 1 else '') + "); lower --batch-size or raise --subset")
    mean, std = channel_statistics(splits[0])
    return {'train': splits[0], 'test': splits[1], 'classes': classes, 'mean': mean, 'std': std, 'size': size,
            'streamed': streamed, 'numerics': numerics}


@torch.no_grad()
def channel_statistics(split, n=10000):
    """Mean and standard deviation of each colour channel in [0, 1], over the split (at most `n` images of it,
    spread through it, for a streamed split). A constant channel's deviation is 1/255, so it never divides by 0."""
    index = torch.arange(len(split))
    if isinstance(split, Streamed):
        index = index[::max(len(split) // n, 1)]
    s = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for x, _ in split.batches(index.split(500)):
        x = x.double().cpu() / 255
        s = s[0] + x.sum((0, 2, 3)), s[1] + (x * x).sum((0, 2, 3))
    count = len(index) * x.shape[2] * x.shape[3]
    mean = s[0] / count
    return mean.float(), ((s[1] / count - mean ** 2).clamp(min=0) * count / max(count - 1, 1)).sqrt().float().clamp(
        min=1 / 255)


def augment(x, generator=None):
    """Pad-4 random crop and random horizontal flip of a whole batch (N, C, H, W) at once, as one gather: CIFAR's
    augmentation, for images of 32 px or less."""
    n, c, h, w = x.shape
    x = F.pad(x, (4, 4, 4, 4))  # after normalisation: pads with the mean colour
    dev, g = x.device, dict(generator=generator, device=x.device)
    i, j = torch.randint(0, 9, (n, 1, 1, 1), **g), torch.randint(0, 9, (n, 1, 1, 1), **g)
    flip = torch.rand(n, 1, 1, 1, **g) < 0.5
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    cols = j + torch.where(flip, w - 1 - cols, cols)
    rows = i + torch.arange(h, device=dev).view(1, 1, h, 1)
    return x[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]


def random_resized_crop(x, generator=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop and RandomHorizontalFlip, the augmentation of its reference recipes, for a
    whole batch at once as one bilinear resampling: each image's crop covers a random fraction of its area in `scale`
    with a log-uniform aspect ratio in `ratio` (shrunk to fit the image where it would not), at a random position,
    flipped with probability 1/2, and is resized to the image's size."""
    n, g = len(x), dict(generator=generator, device=x.device)
    area = torch.rand(n, **g) * (scale[1] - scale[0]) + scale[0]
    aspect = torch.exp(torch.rand(n, **g) * math.log(ratio[1] / ratio[0]) + math.log(ratio[0]))
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of the side
    flip = torch.where(torch.rand(n, **g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)  # output coordinates in [-1, 1] -> input coordinates
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2], theta[:, 1, 2] = (torch.rand(n, **g) * 2 - 1) * (1 - w), (torch.rand(n, **g) * 2 - 1) * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode='bilinear', padding_mode='reflection', align_corners=False)


class Batches:
    """Normalised batches of one split, as Part I's loops take them: re-iterable, with a len. When training:
    shuffled afresh every pass, augmented (`augment` at 32 px or less, else `random_resized_crop`), no short last
    batch, at most `steps` batches a pass. Under torchrun, each process gets its shard of every pass: the order is
    drawn from a seed all processes draw alike (from the global random stream, which they keep in step), the
    augmentation from a generator of each process's own."""

    def __init__(self, data, split, batch_size, train, steps=None):
        self.split, self.data, self.batch_size, self.train = data[split], data, batch_size, train
        self.rank, self.world = rank_and_world()
        n = len(self.split) // self.world if train else math.ceil(len(self.split) / self.world)
        self.count = max(n // batch_size, 1) if train else math.ceil(n / batch_size)
        self.count = min(self.count, steps or self.count)

    def __len__(self):
        return self.count

    def __iter__(self):
        n, device = len(self.split), self.data['numerics'].device
        mean, std = (t.to(device).view(1, -1, 1, 1) for t in (self.data['mean'], self.data['std']))
        seed = torch.randint(2 ** 62, ()).item() if self.train else 0  # the same in every process
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if self.train else torch.arange(n)
        order = order[self.rank::self.world]
        augmentation = torch.Generator(device).manual_seed(seed + 1 + self.rank)
        crop = augment if self.data['size'] <= 32 else random_resized_crop
        for x, y in self.split.batches(order.split(self.batch_size)[:self.count]):
            xb = (x.float() / 255 - mean) / std
            if self.train:
                xb = crop(xb, augmentation)
            if self.data['numerics'].channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, y


@torch.no_grad()
def evaluate(model, data):
    """Top-1 accuracy on the test split, in eval mode (BN running statistics); the model is left in train mode.
    Under torchrun each process scores its shard and the counts are summed."""
    model.eval()
    correct = torch.zeros((), device=data['numerics'].device)
    for xb, yb in Batches(data, 'test', 500, train=False):
        with data['numerics'].autocast():
            correct += (model(xb).argmax(1) == yb).sum()
    model.train()
    return all_reduce(correct, 'sum').item() / len(data['test'])


# --- 12. Networks the tool prunes ------------------------------------------------------------------------------------
# The tool prunes a `Prunable` (section 10): for the built-in networks a `Network`; for --arch torchvision:NAME, and
# to load a network not built of Units, crl_tp.py's TracedNetwork. `plugin` is the one place that imports crl_tp
# (which imports this file and needs torch-pruning): reached through `network` and `as_network` alone.

class Network(Prunable):
    """A network of Units as the tool prunes it: Part I's `Prunable`, with its name and a latency model."""

    def __init__(self, model, input_shape=(3, 32, 32)):
        super().__init__(model, input_shape)
        self.arch, self.classes = getattr(model, 'arch', None), getattr(model, 'num_classes', None)

    def latency_table(self, numerics, batch):
        return build_latency_table(self.model, numerics, batch, self.input_shape)

    def latency(self, table, numerics):
        return Latency(table, numerics)


def is_known(arch):
    return arch in ARCHS or str(arch).startswith('torchvision:')


def plugin():
    """crl_tp.py, CRL on networks not built of Units (it needs the torch-pruning package)."""
    try:
        return importlib.import_module('crl_tp')
    except ImportError as e:
        fail(f"a network not built of Units needs crl_tp.py and the torch-pruning package (pip install -r "
             f"requirements-extras.txt): {first_line(e)}")


def network(arch, width, classes, input_shape=(3, 32, 32), weights=None, cifar_stem=None):
    """The dense network --arch names, as a `Prunable`: built-in, or torchvision:NAME through crl_tp (`weights`: a
    torchvision state dict to start from, its classifier replaced for `classes`; `cifar_stem`: crl_tp.build's)."""
    if str(arch).startswith('torchvision:'):
        return plugin().TracedNetwork(arch, classes, input_shape, weights=weights, cifar_stem=cifar_stem)
    model = build(arch, dense_widths(arch, width), classes)
    check_input_size(model, input_shape, arch)
    return Network(model, input_shape)


@torch.no_grad()
def check_input_size(model, input_shape, arch):
    """One line, before any work, where images of `input_shape` are too small for the network."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    except RuntimeError as e:
        fail(f"{arch}: images of {input_shape[1]}x{input_shape[2]} px are too small for it ({first_line(e)}); "
             f"raise --image-size")
    finally:
        for m, mode in modes.items():
            m.training = mode


def torchvision_weights(args):
    """The state dict --pretrained gives a torchvision model: torchvision's own weights ('torchvision': its DEFAULT
    ones, downloaded once into torch's hub cache) or a file in torchvision's format. Offline, one line that says
    where the file goes."""
    import torchvision
    name = args.arch.partition(':')[2]
    if args.pretrained != 'torchvision':
        try:
            state = torch.load(args.pretrained, map_location='cpu', weights_only=True)
        except Exception as e:
            fail(f"--pretrained {args.pretrained}: cannot load it ({type(e).__name__}: {first_line(e)})")
        if not isinstance(state, dict):
            fail(f"--pretrained {args.pretrained}: not a state dict")
        return state.get('state_dict', state)
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError, KeyError):
        fail(f"--pretrained torchvision: torchvision has no pretrained weights for {name}")
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    try:
        return on_rank0(lambda: torch.hub.load_state_dict_from_url(url, progress=False, weights_only=True)) if \
            not os.path.exists(path) else torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        fail(f"--pretrained torchvision: cannot download {url} ({type(e).__name__}: {first_line(e)}); offline, "
             f"download that file elsewhere and put it at {path}")


def as_network(model, input_shape=(3, 32, 32)):
    """Your own dense network `model` as a `Prunable`: a network of Units directly, any other through crl_tp."""
    if units(model):
        return Network(model, input_shape)
    return plugin().TracedNetwork(getattr(model, 'arch', None), getattr(model, 'num_classes', None), input_shape,
                                  model)


# --- 13. Measured costs: latency ------------------------------------------------------------------------------------
# While pruning, latency is predicted: each unit (conv or linear, BN, ReLU) is timed alone on the target device at a
# small grid of kept (input, output) widths, interpolated bilinearly in between. Units timed alone do not add up to
# the whole network (pools, additions, per-call overheads, caches), so whole networks at a few widths are timed too
# and the prediction is a * (sum over units) + b, fit to them by least squares; a candidate's cost is its prediction
# over the dense network's. A fit that makes no sense (a <= 0, or one that explains little of the timings) is
# reported and replaced by the units' sum alone, which still ranks widths sensibly. The prediction only steers the
# policy: the final mask is found by timing compact networks (`fit_latency`), in turns with the dense one.

@torch.no_grad()
def time_forward(net, x, numerics, repeats=20, warmup=3):
    """Seconds of net(x): warm-up, then the median of `repeats` calls (CUDA events on a GPU), and the spread of the
    calls (interquartile range over the median)."""
    times = []
    for _ in range(warmup + repeats):
        if numerics.device.type == 'cuda':
            with torch.cuda.device(numerics.device):  # events and synchronisation on the network's GPU
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                with numerics.autocast():
                    net(x)
                end.record()
                torch.cuda.synchronize(numerics.device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            with numerics.autocast():
                net(x)
            times.append(time.perf_counter() - t)
    times = sorted(times[warmup:])
    median = times[repeats // 2]
    return median, (times[3 * repeats // 4] - times[repeats // 4]) / median


def time_in_turns(nets, x, numerics, rounds=3, repeats=21, scatter=0.25):
    """Milliseconds of net(x) for whole networks (or any callables) and the spread of their timings: each timed in
    turn, `rounds` times over, the fastest round's median kept. Whatever else the machine is doing then slows them
    alike, so their ratios hold; a shared machine's noise only ever adds time. Timings whose calls scatter more than
    `scatter` are taken again once, as many rounds more."""
    best = [(math.inf, 0.0)] * len(nets)
    for attempt in range(2):
        for _ in range(rounds):
            best = [min(b, time_forward(n, x, numerics, repeats)) for b, n in zip(best, nets)]
        if max(s for _, s in best) <= scatter:
            break
    return [1000 * t for t, _ in best], [s for _, s in best]


def unit_alone(u, cin, cout):
    """What unit `u` computes (layer, BN, ReLU), fresh, at `cin` input and `cout` output channels: timed alone."""
    layer = u.layer
    if isinstance(layer, nn.Linear):
        bn = nn.BatchNorm1d(cout) if isinstance(u.bn, nn.modules.batchnorm._BatchNorm) else nn.Identity()
        return nn.Sequential(nn.Linear(cin, cout), bn)
    conv_groups = cout if u.depthwise else 1
    conv = type(layer)(cin, cout, layer.kernel_size, layer.stride, layer.padding, layer.dilation, conv_groups,
                       bias=False)
    return nn.Sequential(conv, type(u.bn)(cout) if isinstance(u.bn, nn.modules.batchnorm._BatchNorm) else nn.Identity(),
                         nn.ReLU())


def latency_device_name(numerics):
    """The target device as a table records it; on the CPU the thread count matters as much as the chip."""
    d = numerics.device
    return torch.cuda.get_device_name(d) if d.type == 'cuda' else f"cpu ({torch.get_num_threads()} threads)"


def latency_meta(net, numerics, batch):
    """What the latency model of `net` (a `Network`) depends on: a table is reused only where all of it matches."""
    return {'arch': net.arch, 'widths': net.widths, 'num_classes': net.classes, 'input_shape': list(net.input_shape),
            'device': latency_device_name(numerics), 'batch': batch, 'bf16': numerics.bf16,
            'channels_last': numerics.channels_last, 'torch': torch.__version__.split('+')[0]}


@torch.no_grad()
def build_latency_table(model, numerics, batch, input_shape=(3, 32, 32), repeats=5):
    """Milliseconds of every unit alone at a grid of (kept input, kept output) widths, and the fit of whole-network
    timings, on `numerics`' device, precision and memory format, at `batch` inputs, in eval mode. Each distinct unit
    shape is timed once (VGG's repeated layers share their timings)."""
    model = numerics.place(copy.deepcopy(model).eval())
    shapes = {}  # unit -> its input's shape without the batch dim
    hooks = [u.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(i[0].shape[1:])))
             for u in units(model)]
    model(torch.zeros(1, *input_shape, device=numerics.device))
    for h in hooks:
        h.remove()
    widths = group_widths(model)
    grid = lambda g, fixed: [fixed] if g is None else sorted({1, max(1, widths[g] // 2), widths[g]})  # noqa: E731
    timed, tables = {}, []
    for u in units(model):
        gin = grid(u.inp, u.layer.weight.shape[1] * getattr(u.layer, 'groups', 1))
        gout = grid(u.out, u.layer.weight.shape[0])
        ms = torch.zeros(len(gin), len(gout), dtype=torch.float64)
        for a, ci in enumerate(gin):
            for b, co in enumerate(gout):
                if u.depthwise and ci != co:  # a depthwise unit reads and writes one group: its diagonal alone
                    ms[a, b] = math.nan
                    continue
                net = unit_alone(u, ci, co)
                key = (repr(net), shapes[u][1:])
                if key not in timed:
                    x = numerics.random_input(batch, (ci, *shapes[u][1:]))
                    timed[key] = 1000 * time_forward(numerics.place(net.eval()), x, numerics, repeats)[0]
                ms[a, b] = timed[key]
        if u.depthwise:  # only the diagonal is ever used: copy it across
            ms = torch.diag(ms).expand(len(gin), -1).clone()
        tables.append({'inp': u.inp, 'out': u.out, 'grid_in': gin, 'grid_out': gout, 'ms': ms})
    table = {'meta': {'widths': widths}, 'units': tables, 'coef': [1.0, 0.0]}  # `latency_table` adds the rest
    # Calibration: whole networks timed, fit to a * (sum of the units' table values) + b by least squares: b holds
    # pools, additions and per-call overheads.
    candidates = calibration_widths(widths)
    sums = Latency(table).predict_ms(candidates)
    nets = [numerics.place(Prunable(model, input_shape).shrink(w.tolist())) for w in candidates]
    return {**table, **calibrate(nets, torch.stack([sums, torch.ones_like(sums)], 1),
                                 numerics.random_input(batch, input_shape), numerics, repeats)}


def calibration_widths(widths):
    """Eight width vectors to time whole networks at: the dense one, uniformly thinned ones, random ones."""
    dense = torch.tensor(widths)
    keep = torch.cat([torch.tensor([[1.0], [0.6], [0.3], [0.1]]).expand(4, len(dense)),
                      torch.rand(4, len(dense), generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1])
    return (dense * keep).round().clamp(min=1).long()


def calibrate(nets, features, x, numerics, repeats=5):
    """The networks of `calibration_widths` timed in turns, fit by least squares to `features` (one row per network,
    the last column a constant): {'coef', 'fit', 'dense_ms'}. A degenerate fit (R^2 < 0.5, a prediction <= 0, or no
    more time predicted for the dense network than for the thinnest: timings a busy machine scrambled) is reported
    in 'fit' and replaced by the first feature alone, which still rises with every width."""
    measured = torch.tensor(time_in_turns(nets, x, numerics, rounds=2, repeats=repeats)[0], dtype=torch.float64)
    coef = torch.linalg.lstsq(features, measured[:, None]).solution.flatten()
    predicted = features @ coef
    r2 = 1 - ((measured - predicted) ** 2).sum() / ((measured - measured.mean()) ** 2).sum().clamp(min=1e-12)
    fit = {'coef': coef.tolist(), 'r2': r2.item(),
           'degenerate': bool(r2 < 0.5 or (predicted <= 0).any() or predicted[0] <= predicted[3])}
    if fit['degenerate']:
        fit['note'] = (f"the fit of whole-network timings was degenerate (coefficients "
                       f"{', '.join(f'{c:.3g}' for c in fit['coef'])}, R^2 {fit['r2']:.2f}); the first feature alone "
                       f"predicts latency")
    coef = [1.0] + [0.0] * (len(coef) - 1) if fit['degenerate'] else fit['coef']
    return {'coef': coef, 'fit': fit, 'dense_ms': measured[0].item()}


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


class MeasuredCost:
    """The kind of cost that is measured on whole networks (latency; a user's energy meter), as section 10 states
    it: C(widths), the fraction it *predicts*, steers the policy; `measure(small, dense)`, the fraction measured on
    the two networks, decides the budget's feasibility and, through `search`, the final mask. A subclass gives
    `__call__(widths)`, the prediction for a (K, groups) int64 tensor of kept widths on the model's device, K
    fractions (called every pruning step, and by the search on every prefix of the ranking at once: make it cheap),
    and `measurements(*models, rounds)`: each network's measured value (in any unit) and the spread of its
    measurement (interquartile range over median; 0 if exact), the networks measured in turns. `measure` hands it
    eval-mode copies, outside autograd. After the search, `final` holds what was measured of the final network
    ({'fraction', 'pruned', 'dense', 'scatter', 'timings': networks measured})."""
    last = final = None  # what `measure` measured last, and what the search measured of the final network

    @torch.no_grad()
    def measure(self, small, dense, rounds=3):
        def run():  # under torchrun, by process 0 alone: every process must take the same decisions
            models = [copy.deepcopy(m).eval() for m in (small, dense)]  # the user's network is left as it is
            (small_value, dense_value), spread = self.measurements(*models, rounds=rounds)
            return {'pruned': small_value, 'dense': dense_value, 'scatter': max(spread)}
        self.last = on_rank0(run)
        return self.last['pruned'] / self.last['dense']

    def search(self, net, policy, costs, budget, multiple):
        measured = [c for c in costs.values() if hasattr(c, 'measure')]
        mask, finals = on_rank0(lambda: (measured_final_mask(net, policy, costs, budget, multiple).cpu(),
                                         [c.final for c in measured]))
        for c, final in zip(measured, finals):
            c.final = final
        return mask.to(policy.theta.device)

    def results(self, measured, kept, budget):
        """What results.json records of the final network's measurement (`measured`: what the search measured), and
        the line that reports it."""
        return measured, f"measured: {measured['fraction']:.3f} of the dense network's value (budget {budget:.3f})"


class LatencyCost(MeasuredCost):
    """A latency cost: C(widths) = predicted latency / predicted dense latency, for K width vectors at once (a ratio
    of two predictions: one noisy timing of the dense network does not shift every fraction); `measurements` times
    whole networks where the table was made (`numerics`). Subclasses predict: `predict_ms(widths)`."""

    def __init__(self, table, numerics=None):
        self.table, self.numerics, self.dense = table, numerics, table.get('dense_ms')  # dense: in ms, its unit
        self.dense_predicted_ms = self.predict_ms(torch.tensor([table['meta']['widths']])).item()
        self.build_s = 0.0  # the time its table took to build (0: reused)

    def __call__(self, widths):
        return self.predict_ms(widths) / self.dense_predicted_ms

    def results(self, measured, kept, budget):
        """What results.json records of the final network's latency (`measured`: what the search timed), and the
        line that reports it."""
        m = self.table['meta']
        r = {**self.numerics.describe(), 'device': m['device'], 'batch': m['batch'], 'table_build_s': self.build_s,
             'fit': self.table.get('fit'), 'dense_measured_ms': measured['dense'],
             'dense_predicted_ms': self.dense_predicted_ms, 'pruned_measured_ms': measured['pruned'],
             'pruned_predicted_ms': self.predict_ms(kept).item(), 'budget_used': measured['fraction'] / budget,
             'scatter': measured['scatter'], 'noisy': measured['scatter'] > 0.25, 'networks_timed': measured['timings']}
        line = (f"latency on {r['device']}, batch {r['batch']}, timed in turns: dense {r['dense_measured_ms']:.3f} ms, "
                f"pruned {r['pruned_measured_ms']:.3f} ms ({measured['fraction']:.3f} of dense, budget {budget:.3f}, "
                f"{100 * r['budget_used']:.0f}% used); predicted {r['pruned_predicted_ms']:.3f} ms"
                + ('; the timings scattered widely (busy machine?)' if r['noisy'] else ''))
        return r, line

    def measurements(self, *models, rounds=3):
        """Measured milliseconds of whole networks (eval mode) at the table's batch, timed in turns, and their
        spreads."""
        nets = [self.numerics.place(copy.deepcopy(m).eval()) for m in models]
        x = self.numerics.random_input(self.table['meta']['batch'], self.table['meta']['input_shape'])
        return time_in_turns(nets, x, self.numerics, rounds)


class Latency(LatencyCost):
    """The latency cost of a network of Units: a * (sum over its units of their tables, at the candidate's widths)
    + b."""

    def __init__(self, table, numerics=None):
        g = len(table['meta']['widths'])
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
        super().__init__(table, numerics)

    def predict_ms(self, widths):
        self.flat, self.index = self.flat.to(widths.device), [v.to(widths.device) for v in self.index]  # moved once
        offsets, rows, cols, strides = self.index
        w = torch.cat([widths, torch.zeros_like(widths[..., :1])], -1)
        a, b = self.table['coef']
        return self.flat[offsets + w[..., rows] * strides + w[..., cols]].sum(-1) * a + b


def measured_final_mask(net, policy, costs, budget, multiple):
    """The final mask where some costs are measured (`measure`: latency), found by measuring: the longest prefix of
    the ranking (as `final_mask` ranks) whose compact network's *measured* costs meet their budgets, within every
    predicted budget (to 0.5% of the ranking). A bisection over the prefixes starts at the one the predictions chose
    and moves either way: longer while the measurements meet the budgets, shorter while not; the last one is measured
    again at more rounds before it is kept. Each measured cost keeps what it measured of that network in `final`."""
    measured = [hasattr(c, 'measure') for c in costs.values()]
    predicted = {n: c for (n, c), m in zip(costs.items(), measured) if not m}
    counts = prefixes(policy, multiple)
    others = allowed(predicted, budget[[not m for m in measured]], counts)
    candidates = others.nonzero().flatten()  # prefix lengths every predicted budget allows, shortest first
    if not len(candidates):
        fail(f'the budget is below the smallest network ({multiple} channel(s) per group)')
    guess = allowed(costs, budget, counts[candidates])  # what the predictions of the measured costs allow
    timings = {}

    def meets(i, rounds=3):
        small = net.compact(policy.split(keep_top(policy, counts[candidates[i]].tolist())))
        timings[i] = {n: {'fraction': c.measure(small, net.plain, rounds), **c.last}
                      for (n, c), m in zip(costs.items(), measured) if m}
        return all(t['fraction'] <= budget[list(costs).index(n)] for n, t in timings[i].items())

    lo, hi = -1, len(candidates)  # measured so far: lo meets the budgets (-1: none yet), hi does not
    i, step = (guess.nonzero().max().item() if guess.any() else 0), 1
    while hi - lo > max(1, len(candidates) // 200):  # gallop away from the predictions' choice while one side is
        # open, then bisect, down to 0.5% of the ranking: what a few channels more would add is within the noise
        lo, hi = (i, hi) if meets(i) else (lo, i)
        i = lo + step if hi == len(candidates) else hi - step if lo == -1 else (lo + hi) // 2
        i, step = min(max(i, lo + 1), hi - 1), step * 2
    tries = 0  # one slow moment must not keep a network over its budget, nor cost many channels: 5% steps down,
    while lo > 0 and not meets(lo, rounds=5):  # then halves (a machine busy throughout must not make this endless)
        lo, tries = lo * 19 // 20 if tries < 8 else lo // 2, tries + 1
    chosen = max(lo, 0)
    if chosen not in timings:
        meets(chosen)
    for name, t in timings[chosen].items():
        costs[name].final = {**t, 'timings': len(timings)}
    return keep_top(policy, counts[candidates[chosen]].tolist())


def latency_table(net, numerics, batch):
    """The latency model of `net` (a `Network`) timed on `numerics`' device at `batch` inputs, with what it depends
    on (`latency_meta`)."""
    return {**net.latency_table(numerics, batch), 'meta': latency_meta(net, numerics, batch)}


def latency_cost(net, args):
    """The latency cost of `net` (a `Prunable`) on --latency-device: the table from --latency-table (on --resume:
    the interrupted run's), checked against this run, or built now and saved in --out."""
    flag = '--latency-device' if args.latency_device else '--device'
    numerics = Numerics(get_device(args.latency_device or args.device, flag), args.bf16, args.channels_last)
    path = args.latency_table or (os.path.join(args.out, 'latency_table.pt') if args.resume else None)
    if path:
        try:
            table = torch.load(path, map_location='cpu', weights_only=True)
            meta = table['meta']
        except Exception as e:
            fail(f"--latency-table {path}: not a latency table ({type(e).__name__})")
        want = latency_meta(net, numerics, args.latency_batch)
        wrong = [k for k in want if meta.get(k) != want[k]]
        if wrong:
            fail(f"--latency-table {path}: made for another " + ', '.join(
                f"{k} ({meta.get(k)!r}, this run: {want[k]!r})" for k in wrong))
        build_s = 0.0
    else:
        t0 = time.time()
        table = on_rank0(lambda: latency_table(net, numerics, args.latency_batch))  # timed once, sent to all
        build_s = time.time() - t0
        if rank_and_world()[0] == 0:
            os.makedirs(args.out, exist_ok=True)
            save_atomic(table, os.path.join(args.out, 'latency_table.pt'))
        print(f"latency model: timed on {table['meta']['device']} at batch {args.latency_batch} in {build_s:.1f} s; "
              f"dense network {table['dense_ms']:.3f} ms; fit R^2 {table['fit']['r2']:.2f}"
              + (f"; note: {table['fit']['note']}" if table['fit'].get('note') else ''))
    cost = net.latency(table, numerics)
    cost.build_s = build_s
    return cost


# --- 14. User-defined costs: any function of the kept widths, a black box -------------------------------------------
# --cost NAME=path/to/file.py:function registers `function(widths, group_names)`: widths is a (K, groups) int64 CPU
# tensor (kept channels per group of K candidate networks), group_names the groups' names in order; it returns K
# numbers (any sequence or tensor), the cost of each candidate in its own unit. It is called once per pruning step
# with all K candidates (and by the final mask with every prefix of the ranking), never differentiated; budgets are
# fractions of its value at the dense widths (or absolute values in its unit).

def user_cost(spec, widths, names):
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
            v = torch.as_tensor(fn(widths.cpu(), list(names)), dtype=torch.float64).flatten()
        except Exception as e:
            fail(f"{where}: the function raised {type(e).__name__}: {first_line(e)}")
        if v.shape != (len(widths),):
            fail(f"{where}: returned {tuple(v.shape)} values for {len(widths)} candidates; return one per candidate")
        if not torch.isfinite(v).all():
            fail(f"{where}: returned a non-finite value ({v.tolist()[:4]})")
        return v.to(widths.device)

    dense = evaluate_fn(torch.tensor([list(widths), [1] * len(widths)]))[0].item()  # shape and finiteness checked too
    if not dense > 0:
        fail(f"{where}: the dense network's cost is {dense}; it must be positive to take fractions of it")
    fraction = lambda widths: evaluate_fn(widths) / dense  # noqa: E731
    fraction.dense = dense
    return name, fraction


def group_names(model):
    return list(getattr(model, 'group_names', None) or [f'group{g}' for g in range(len(group_widths(model)))])


# --- 15. Progress, metrics and checkpoints: callbacks of Part I's loops ----------------------------------------------

PHASES = ('dense', 'prune', 'finetune')


def duration(seconds):
    """'45s', '1m23s' or '2h05m'."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


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


class Progress:
    """A callback of Part I's loops: sums of loss, correct predictions (and sampled costs) kept as one device tensor,
    so that a step never waits for the device; one line is printed every `every` steps and at the end of each epoch,
    and is also a row of `metrics`. Throughput and the time left in the phase (of `total_steps`) are steady-state:
    timed from the end of the first `warmup` steps, whose extra time (compilation, autotuning) is reported apart."""

    def __init__(self, phase, every, device, cost_names=(), warmup=5, total_steps=0, metrics=None):
        self.phase, self.every, self.device, self.warmup = phase, every, device, warmup
        self.cost_names, self.total_steps, self.metrics = list(cost_names), total_steps, metrics
        self.sums = torch.zeros(2 + len(self.cost_names), device=device, dtype=torch.float64)
        self.images = self.seen = self.steps = 0  # this process's; the rates count every process's images
        self.start, self.world = time.time(), rank_and_world()[1]
        self.tick = self.start
        self.warm = None  # (time, images) once the warm-up steps are done

    def __call__(self, event):
        if event['step'] is not None:
            self.add(event['loss'], event['logits'], event['labels'], event.get('cost'))
            self.maybe_print(event['epoch'], event['step'], event['steps'], event['objects'])

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

    def describe(self, mean_cost, objects):
        """The expected cost of each constraint next to its multiplier, and the keep-probabilities."""
        if not self.cost_names:
            return '', {}
        lams, p = objects['lam'].tolist(), torch.sigmoid(objects['policy'].theta.detach())
        keep = torch.stack([p.mean(), (p < 0.1).float().mean(), (p > 0.9).float().mean()]).tolist()
        pairs = lambda values: ' '.join(f"{n}={v:.3f}" for n, v in zip(self.cost_names, values))  # noqa: E731
        return (f"cost {pairs(mean_cost)} lam {pairs(lams)} keep {keep[0]:.3f}",
                {**{f'cost_{n}': v for n, v in zip(self.cost_names, mean_cost)},
                 **{f'lambda_{n}': v for n, v in zip(self.cost_names, lams)},
                 'keep_mean': keep[0], 'keep_below_0.1': keep[1], 'keep_above_0.9': keep[2]})

    def maybe_print(self, epoch, step, steps, objects=None):
        if step % self.every and step != steps:
            return
        s, n, now = self.sums.tolist(), self.images - self.seen, time.time()
        if not all(map(math.isfinite, s)):  # checked where the sums reach the host anyway: no extra sync
            fail(f"{self.phase} epoch {epoch} step {step}: the loss or a cost became {s[0] / n} (NaN or inf); "
                 f"training diverged, most likely a learning rate too high for this network (--lr, --prune-lr)")
        done = (epoch - 1) * steps + step  # steps of the phase so far, counted from its start even after a resume
        rate, eta = self.world * n / (now - self.tick), self.eta(now, max(self.total_steps - done, 0))
        text, values = self.describe([v / n for v in s[2:]], objects)
        print(f"{self.phase} epoch {epoch} step {step}/{steps} loss {s[0] / n:.3f} acc {s[1] / n:.3f} img/s "
              f"{rate:.0f} eta {duration(eta)} {text}".rstrip(), flush=True)
        if self.metrics:
            self.metrics.log(self.phase, epoch, done, round(done * self.world * self.images / self.steps),
                             loss=s[0] / n, accuracy=s[1] / n, images_per_s=round(rate, 1), eta_s=round(eta, 1),
                             **values)
        self.sums.zero_()
        self.tick, self.seen = now, self.images

    def speed(self):
        """{'images_per_s': steady-state training throughput, 'overhead_s': what the warm-up steps took beyond
        the steady-state time of as many steps (compilation, autotuning)}."""
        sync(self.device)
        now = time.time()
        if self.warm is None:  # too few steps for a steady state
            return {'images_per_s': self.world * self.images / max(now - self.start, 1e-9), 'overhead_s': 0.0}
        t, images = self.warm
        rate = self.world * (self.images - images) / max(now - t, 1e-9)
        return {'images_per_s': rate, 'overhead_s': max(t - self.start - self.world * images / rate, 0.0) if rate else
                0.0}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# At the end of an epoch (at most once per --checkpoint-every seconds, always at the end of a phase) everything the
# rest of the run depends on goes into OUT/checkpoint.pt: phase and epoch, the loop's objects (network, optimisers,
# scheduler, policy, multipliers), random number generators, and what the finished phases measured. --resume
# continues from there; since the random streams are restored with the rest, the resumed run computes what the
# uninterrupted one would have (bit for bit on the CPU; on a GPU up to its nondeterministic kernels).

def rng_state():
    """The global random streams: the CPU's and the current CUDA device's (every process keeps them alike)."""
    return {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def refuse_diverged(model, where):
    """Stop, with one line, before a network with NaN or infinite weights is saved over a good file."""
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        fail(f"{where}: the weights became NaN or inf; training diverged, most likely a learning rate too high for "
             f"this network (--lr, --prune-lr)")


class Checkpoint:
    """OUT/checkpoint.pt, as a callback of Part I's loops (`__call__` saves at epochs' ends, `resume` restores).
    `report` holds what finished phases measured."""

    FREE = ('resume', 'overwrite', 'log_every', 'checkpoint_every')  # may change on --resume

    def __init__(self, args=None):  # without args: saves nothing
        self.state, self.saved, self.report, self.path = None, None, {}, None
        if args is None:
            return
        self.path, self.every = os.path.join(args.out, 'checkpoint.pt'), args.checkpoint_every
        self.last_save = time.time()
        self.args = {k: v for k, v in vars(args).items() if k not in self.FREE}
        self.args['processes'] = rank_and_world()[1]  # torchrun's: the shards of the data follow it
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

    def resume(self, phase, objects):
        """The epoch to continue `phase` from: 1 on a fresh start; on resuming inside `phase`, the one after the saved
        epoch, with `objects` (tensors in place) and the random generators set back to their state at its end."""
        if self.state is None or self.state['phase'] != phase:
            return 1
        for name, obj in objects.items():
            saved = self.state['objects'][name]
            if isinstance(obj, torch.Tensor):  # the loop's own tensors (the multipliers): replaced in its state
                objects[name] = saved.to(obj.device)
            else:
                obj.load_state_dict(saved)
        torch.set_rng_state(self.state['rng']['cpu'])
        if self.state['rng']['cuda'] is not None:
            torch.cuda.set_rng_state(self.state['rng']['cuda'])
        return self.state['epoch'] + 1

    def __call__(self, event):
        """At the end of an epoch: saved when --checkpoint-every seconds have passed, and always at a phase's end."""
        last = event['epoch'] == event['epochs']
        if event['step'] is not None or self.path is None or not (last or time.time() - self.last_save >= self.every):
            return
        if rank_and_world()[0]:  # process 0 writes; the others hold the same state
            self.saved = (event['phase'], event['epoch'])
            return
        objects = event['objects']
        refuse_diverged(objects['model'], f"{event['phase']} epoch {event['epoch']}")
        state = {name: obj.state_dict() if hasattr(obj, 'state_dict') else obj for name, obj in objects.items()}
        save_atomic({'phase': event['phase'], 'epoch': event['epoch'], 'args': self.args, 'objects': state,
                     'rng': rng_state(), 'report': self.report}, self.path)
        self.last_save, self.saved = time.time(), (event['phase'], event['epoch'])

    def describe(self):
        return f"{self.path} holds the state at the end of {self.saved[0]} epoch {self.saved[1]}"


# --- 16. Saving, loading, export and inference speed ------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save (json.dump for a .json path) under a temporary name, then a rename: a kill during the save leaves
    the previous file whole."""
    path = os.fspath(path)
    if path.endswith('.json'):
        with open(path + '.tmp', 'w') as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def save_pruned(model, path, mean=None, std=None, classes=None, input_shape=(3, 32, 32), **info):
    """A plain dict that torch.load(..., weights_only=True) opens: the weights, the widths of every group, and what
    a deployer needs (input normalisation, class names, input shape). `load_pruned` rebuilds the network from it.
    info: more entries (the width multiplier; for a network not built of Units: arch, num_classes, widths,
    group_names)."""
    known = {'arch': getattr(model, 'arch', None), 'num_classes': getattr(model, 'num_classes', None), 'width': None}
    if units(model):
        known.update(widths=group_widths(model), group_names=group_names(model))
    save_atomic({**known, **info, 'state_dict': model.state_dict(), 'input_shape': list(input_shape),
                 'mean': None if mean is None else torch.as_tensor(mean).tolist(),
                 'std': None if std is None else torch.as_tensor(std).tolist(),
                 'classes': None if classes is None else list(classes)}, path)


def load_pruned(path, model=None, device='cpu'):
    """The network saved by `save_pruned` (pruned.pt or dense.pt of a run) in eval mode, and its info: {'mean',
    'std' (normalise inputs in [0, 1] as (x - mean) / std per channel), 'classes', 'input_shape', 'widths', ...}.
    A built-in architecture is rebuilt by name (a torchvision one through crl_tp); for your own network pass `model`,
    an instance of its dense form (any weights): it is cut to the saved widths, then the saved weights go in."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    arch, classes, shape = ckpt.get('arch'), ckpt.get('num_classes'), ckpt.get('input_shape') or (3, 32, 32)
    if model is None and not is_known(arch):
        fail(f"{path} holds a {arch}, not a built-in network: pass model=, an instance of its dense form")
    if model is None and arch in ARCHS:  # built at the saved widths (a width multiplier above 1 included)
        net = build(arch, ckpt['widths'], classes)
    else:  # the dense form (given, or a torchvision one built by name), cut to the saved widths
        dense = network(arch, 1.0, classes, shape, cifar_stem=ckpt.get('cifar_stem')) if model is None else \
            as_network(model.to(device), shape)
        net = dense.shrink(ckpt['widths'])
    net.to(device).load_state_dict(ckpt['state_dict'])
    return net.eval(), {k: v for k, v in ckpt.items() if k != 'state_dict'}


@torch.no_grad()
def fold_bn(model):
    """A copy of `model` for inference, each Unit's BN folded into its layer: W' = W s, b' = (b - mean) s + beta
    with s = gamma / sqrt(var + eps) per output channel. In eval mode it computes what `model` computes (up to
    rounding) with one kernel and one pass over the activations less per unit; it is not for training. A network
    without Units (a torchvision one) is folded by torch.fx where it traces symbolically, else left as it is."""
    folded = copy.deepcopy(model).eval()
    if not units(folded):
        try:
            from torch.fx.experimental.optimization import fuse
            return fuse(folded)
        except Exception:
            return folded
    for u in units(folded):
        bn, layer = u.bn, u.layer
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        s = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1)
        layer.weight.mul_(s.view(-1, *[1] * (layer.weight.dim() - 1)))
        bias = (0 if layer.bias is None else layer.bias) - bn.running_mean
        layer.bias = nn.Parameter(bias * s + (bn.bias if bn.affine else 0))
        u.bn = nn.Identity()
    return folded


def onnx_available():
    """torch's ONNX exporter needs the onnxscript package (which brings onnx)."""
    return all(importlib.util.find_spec(m) is not None for m in ('onnx', 'onnxscript'))


def any_batch(input_shape):
    """An example input of `input_shape` and torch.export's spec that its batch size may be any."""
    return (torch.randn(2, *input_shape),), ({0: torch.export.Dim('batch', min=1, max=65536)},)


def to_onnx(model, input_shape):
    """`model` as an ONNX program (torch's exporter), any batch size."""
    example, batch = any_batch(input_shape)
    return torch.onnx.export(model, example, dynamo=True, dynamic_shapes=batch, input_names=['input'],
                             output_names=['logits'], verbose=False)


def export_pruned(path, out_path, model=None):
    """Export a network saved by `save_pruned` for deployment without this file, its BN folded into the layers:
    ONNX if out_path ends in .onnx (needs onnxscript), else a torch.export program (.pt2, opened with
    torch.export.load(out_path).module()). Input: float32 (N, C, H, W) images, pixel values in [0, 1] normalised as
    (x - mean) / std per channel, any batch size N; output: (N, classes) logits. The normalisation and class names
    are in the ONNX file's metadata_props (lists as JSON text), or in a JSON file next to the .pt2 (same name,
    .json). model: as for `load_pruned`. Returns the metadata."""
    net, info = load_pruned(path, model)
    net, shape = fold_bn(net), info.get('input_shape') or [3, 32, 32]
    meta = {'arch': info.get('arch'), 'widths': info['widths'], 'classes': info.get('classes'),
            'num_classes': info.get('num_classes'), 'mean': info.get('mean'), 'std': info.get('std'),
            'input_layout': 'NCHW', 'input_shape': ['N', *shape], 'resize': info.get('resize'),
            'input': f"float32 images, shorter side resized to {info.get('resize') or shape[-1]} px and centre-cropped "
                     f"to {shape[-1]}x{shape[-1]}, pixel values in [0, 1], normalised as (x - mean) / std per channel",
            'output': 'logits, (N, classes)'}
    if out_path.endswith('.onnx'):
        import onnx
        proto = to_onnx(net, shape).model_proto
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
        onnx.save(proto, out_path)
    else:
        example, batch = any_batch(shape)
        torch.export.save(torch.export.export(net, example, dynamic_shapes=batch), out_path)
        with open(os.path.splitext(out_path)[0] + '.json', 'w') as f:
            json.dump(meta, f, indent=1)
    return meta


# Inference speed, dense against compact, in each way a user would run a network: `eager` (eval mode as trained),
# `folded` (BN folded into the layers), `compiled` (torch.compile of the folded network; on CUDA also `cudagraphs`,
# its reduce-overhead mode, which replays the whole network as one CUDA graph) and `onnxruntime` (the folded
# network exported to ONNX, run by ONNX Runtime on the CPU, where it is installed).
SPEED_MODES = ('eager', 'folded', 'compiled', 'cudagraphs', 'onnxruntime')


def runner(model, mode, numerics, input_shape):
    """A callable x -> outputs of `model` (eval mode) run in `mode`; None where that mode cannot run here."""
    if mode == 'eager':
        return numerics.place(copy.deepcopy(model).eval())
    folded = numerics.place(fold_bn(model))
    if mode == 'folded':
        return folded
    if mode in ('compiled', 'cudagraphs'):
        if mode == 'cudagraphs' and numerics.device.type != 'cuda':
            return None
        return torch.compile(folded, mode='reduce-overhead' if mode == 'cudagraphs' else None)
    if not (onnx_available() and importlib.util.find_spec('onnxruntime')):
        return None
    import onnxruntime
    session = onnxruntime.InferenceSession(to_onnx(folded.cpu().float(), input_shape).model_proto.SerializeToString(),
                                           providers=['CPUExecutionProvider'])
    return lambda x: session.run(None, {'input': x.float().cpu().numpy()})


@torch.no_grad()
def inference_speed(dense, pruned, numerics, input_shape, batches, modes=SPEED_MODES):
    """Rows {mode, batch, dense_ms, pruned_ms, speedup, macs_ratio}: the median latency of a batch, the two networks
    timed in turns (`time_in_turns`), in every mode that runs here, at every batch size."""
    macs_ratio = count(dense, input_shape)[1] / count(pruned, input_shape)[1]
    rows = []
    for mode in modes:
        try:  # built, compiled or exported now: a mode that fails here is skipped, with its reason
            nets = [runner(m, mode, numerics, input_shape) for m in (dense, pruned)]
            if nets[0] is None:
                continue
            for net in nets:
                net(numerics.random_input(1, input_shape))
        except Exception as e:
            print(f"inference speed: {mode} skipped ({type(e).__name__}: {first_line(e)})")
            continue
        for batch in batches:
            x = numerics.random_input(batch, input_shape)
            (d, p), spread = time_in_turns(nets, x, numerics)
            rows.append({'mode': mode, 'batch': batch, 'dense_ms': d, 'pruned_ms': p, 'speedup': d / p,
                         'macs_ratio': macs_ratio, 'images_per_s': 1000 * batch / p, 'scatter': max(spread)})
    return rows


def speed_table(rows):
    lines = ['mode         batch   dense ms   pruned ms   speed-up   MAC ratio   pruned img/s',
             *(f"{r['mode']:12} {r['batch']:5} {r['dense_ms']:10.3f} {r['pruned_ms']:11.3f} {r['speedup']:9.2f}x "
               f"{r['macs_ratio']:10.2f}x {r['images_per_s']:14,.0f}" for r in rows)]
    return '\n'.join(lines)


# --- 17. The command line ---------------------------------------------------------------------------------------------

BUILT_IN = COSTS + ['latency']  # cost names a budget may use without --cost


def cost_names(args):
    """The cost names a budget may use: the built-in ones and those of --cost."""
    return BUILT_IN + [spec.partition('=')[0] for spec in args.cost]


BUDGET_UNITS = {'K': 1e3, 'M': 1e6, 'G': 1e9, 'us': 1e-3, 'ms': 1.0, 's': 1e3}  # counts; latency in ms


def parse_args(argv):
    """The command line's arguments, checked (`check_args`), --arch and --width taken from --pretrained where not
    given, --out defaulted: what the run reads, never changed after this."""
    args = parser().parse_args(argv)
    take_pretrained_shape(args)
    check_args(args)
    args.out = args.out or os.path.join('runs', f"{args.arch}-{args.budget}".replace(':', '-').replace(
        '=', '').replace(',', '-'))
    return args


def parser():
    p = argparse.ArgumentParser(description='Prune an image classifier under a budget with constrained RL; under '
                                'torchrun on several processes (see README).')
    p.error = fail  # bad arguments: one line, like every other bad input
    p.add_argument('--arch', help=f"one of {', '.join(ARCHS)} (default: vgg16, or that of --pretrained)")
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
    p.add_argument('--image-size', type=int, help="side of the square images the network sees (default: the data's "
                   "own, 32 for CIFAR); every cost, table and export is at this size")
    p.add_argument('--loader', default='auto', choices=['auto', 'memory', 'stream'], help='memory: the decoded set '
                   'on the device; stream: decoded batch by batch by --workers processes; auto: memory where it '
                   'takes under a quarter of the device\'s (the host\'s free) memory')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='decoding processes of the '
                   'streaming loader (0: in the main process)')
    p.add_argument('--pretrained', help='dense.pt of an earlier run (skips dense training); or, for '
                   'torchvision:NAME, "torchvision" (its ImageNet weights) or a state-dict file in torchvision\'s '
                   'format: the classifier replaced for the data\'s classes, then fine-tuned for --dense-epochs')
    p.add_argument('--width', type=float, help='multiplier of every layer width (default: 1, or that of --pretrained)')
    p.add_argument('--dense-epochs', type=int, default=60)
    p.add_argument('--prune-epochs', type=int, default=20)
    p.add_argument('--finetune-epochs', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--lr', type=float, default=0.1, help='peak learning rate of dense training and fine-tuning')
    p.add_argument('--prune-lr', type=float, default=0.02, help='peak learning rate of the weights while pruning')
    p.add_argument('--wd', type=float, default=5e-4, help='weight decay')
    p.add_argument('--samples', type=int, default=8, help='K, masks sampled per pruning step')
    p.add_argument('--policy-lr', type=float, default=0.2, help='Adam learning rate of the policy logits')
    p.add_argument('--dual-lr', type=float, default=0.05, help='eta, step of the dual ascent')
    p.add_argument('--damping', type=float, default=100.0, help='weight of the proportional term of the multipliers')
    p.add_argument('--lead', type=float, default=5.0, help='steps ahead at which the proportional term predicts the '
                   "cost, from its last step's change (0: the current cost)")
    p.add_argument('--init-keep', type=float, default=0.9, help='initial keep-probability of every channel')
    p.add_argument('--anneal', type=float, default=1/6, help='fraction of the pruning steps over which the budget '
                   "falls from the initial policy's expected cost to its value (0: the budget from the first step)")
    p.add_argument('--no-control-variate', dest='control_variate', action='store_false', help="plain REINFORCE on "
                   "the costs, without their first-order expansion as a control variate (slower to the budget)")
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
    p.add_argument('--speed', nargs='?', const=','.join(SPEED_MODES), metavar='MODES',
                   help=f"also time inference of the dense and the pruned network in these modes (default: all of "
                   f"{','.join(SPEED_MODES)} that run here)")
    p.add_argument('--speed-batch', type=int, help='the large batch of --speed (default: 512 on CUDA, 64 on the CPU; '
                   'batch 1 is always timed)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--log-every', type=int, default=100, help='steps between progress lines')
    p.add_argument('--tensorboard', action='store_true', help='also write the scalars of metrics.csv as TensorBoard '
                   'events into OUT/tensorboard (needs the tensorboard package)')
    p.add_argument('--export', action='store_true', help='also export the pruned network, BN folded: pruned.onnx '
                   'where onnxscript is installed, else pruned.pt2 (torch.export) with pruned.json')
    p.add_argument('--out', help='output directory (default: runs/ARCH-BUDGET)')
    p.add_argument('--overwrite', action='store_true', help='replace the results already in --out')
    p.add_argument('--resume', action='store_true', help='continue the interrupted run in --out from its checkpoint')
    p.add_argument('--checkpoint-every', type=float, default=60, metavar='SECONDS',
                   help='least time between two checkpoints (one is always written at the end of each phase)')
    return p


def check_args(args):
    """Every argument that can be checked before any work, each a one-line error."""
    check_arch(args)
    parse_budget(args.budget, cost_names(args))  # checked now; the pipeline parses it again
    for name in ('latency_batch', 'speed_batch', 'image_size'):
        if (getattr(args, name) or 1) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    for name in ('dense_epochs', 'prune_epochs', 'finetune_epochs', 'subset', 'workers'):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0")
    for name in ('width', 'batch_size', 'lr', 'prune_lr', 'policy_lr', 'log_every'):
        if not 0 < getattr(args, name) < math.inf:
            fail(f"--{name.replace('_', '-')} must be a positive finite number")
    for name in ('wd', 'dual_lr', 'damping', 'lead', 'checkpoint_every'):
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
    if not 0 <= args.anneal <= 1:
        fail('--anneal must be in [0, 1]')
    if not 0 < args.init_keep < 1:
        fail('--init-keep must be in (0, 1)')
    unknown = set((args.speed or 'eager').split(',')) - set(SPEED_MODES)
    if unknown:
        fail(f"--speed {args.speed}: unknown mode {', '.join(sorted(unknown))}; choose from {', '.join(SPEED_MODES)}")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            fail('--tensorboard needs the tensorboard package (pip install tensorboard); metrics.csv has the same '
                 'scalars without it')


def check_arch(args):
    """A built-in architecture, or torchvision:NAME of a torchvision classification model (needs torch-pruning)."""
    if not is_known(args.arch):
        fail(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}, or torchvision:NAME")
    if args.arch.startswith('torchvision:'):
        import torchvision
        name = args.arch.partition(':')[2]
        if name not in torchvision.models.list_models(torchvision.models):
            fail(f"--arch {args.arch}: torchvision has no classification model {name!r}")
        if importlib.util.find_spec('torch_pruning') is None:
            fail(f"--arch {args.arch} needs the torch-pruning package (pip install -r requirements-extras.txt)")
        if args.width != 1:
            fail(f"--width {args.width:g}: the width multiplier is for the built-in architectures")


def take_pretrained_shape(args):
    """--arch, --width and --image-size from the --pretrained checkpoint where it records them; given ones must
    agree with it."""
    saved = {}
    if args.pretrained == 'torchvision':
        if not str(args.arch).startswith('torchvision:'):
            fail('--pretrained torchvision: the weights of torchvision\'s models, for --arch torchvision:NAME')
    elif args.pretrained:
        if not os.path.isfile(args.pretrained):
            fail(f"--pretrained {args.pretrained}: no such file")
        try:
            ckpt = torch.load(args.pretrained, map_location='cpu', weights_only=True, mmap=True)
        except Exception as e:
            fail(f"--pretrained {args.pretrained}: cannot load it ({type(e).__name__}: {first_line(e)})")
        if isinstance(ckpt, dict) and is_known(ckpt.get('arch')) and 'widths' in ckpt:
            arch, widths = ckpt['arch'], ckpt['widths']
            width = 1.0 if arch not in ARCHS else ckpt.get('width') or next(
                (w for w in (c / b for c, b in zip(widths, dense_widths(arch))) if dense_widths(arch, w) == widths),
                widths[0] / 64)  # a checkpoint that does not record its width multiplier
            saved = {'arch': arch, 'width': width, 'widths': widths, 'size': (ckpt.get('input_shape') or [32])[-1]}
    args.arch = args.arch or saved.get('arch', 'vgg16')
    args.width = saved.get('width', 1.0) if args.width is None else args.width
    if saved and args.image_size not in (None, saved['size']):
        fail(f"--pretrained {args.pretrained} was trained on {saved['size']}-px images, not {args.image_size}")
    args.image_size = args.image_size or saved.get('size')
    if saved and (args.arch != saved['arch'] or args.arch in ARCHS and dense_widths(args.arch, args.width) !=
                  saved['widths']):
        fail(f"--pretrained {args.pretrained} holds a {saved['arch']} of width {saved['width']:g}, not a "
             f"{args.arch} of width {args.width:g}; drop --arch and --width to take the checkpoint's")


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
        unit = next((u for u in sorted(BUDGET_UNITS, key=len, reverse=True) if value.endswith(u)), '')
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
        fractions[name] = number * BUDGET_UNITS[unit] / dense[name] if unit else number
        if fractions[name] > 1:
            fail(f"--budget {name}={number:g}{unit}: more than the dense network's {dense[name]:g}"
                 f"{'ms' if name == 'latency' else ''}; nothing to prune")
    return fractions


def get_device(name, flag):
    try:
        device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name)
    except RuntimeError:
        fail(f"{flag} {name}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type not in ('cpu', 'cuda') or (device.type == 'cuda' and not torch.cuda.is_available()):
        fail(f"{flag} {name}: not available on this machine; use cpu{' or cuda' if torch.cuda.is_available() else ''}")
    return device


def start_processes(args):
    """This process's device. Under torchrun (WORLD_SIZE set) also the process group: NCCL on CUDA, each process on
    the GPU of its LOCAL_RANK; gloo on the CPU."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and args.device not in ('auto', 'cpu', 'cuda'):
        fail(f"--device {args.device}: under torchrun each process takes the GPU of its LOCAL_RANK; use --device "
             f"auto, cuda or cpu")
    device = get_device(args.device, '--device')
    if world > 1:
        if device.type == 'cuda':
            local_world, gpus = int(os.environ.get('LOCAL_WORLD_SIZE', world)), torch.cuda.device_count()
            if local_world > gpus:
                fail(f"torchrun: {local_world} processes on this machine but {gpus} GPU(s); one GPU each, "
                     f"--nproc_per_node {gpus} at most (or --device cpu)")
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                                 device_id=device if device.type == 'cuda' else None)
    if device.type == 'cuda':
        torch.cuda.set_device(device)  # the current device: its random stream is the one a checkpoint saves
    return device


def pretrained_kind(args):
    """What --pretrained holds: None, 'dense' (a dense.pt of this tool, or a state dict of a built-in network: no
    dense training) or 'torchvision' (torchvision's weights or a file in its format: the dense phase fine-tunes)."""
    if not args.pretrained:
        return None
    if not args.arch.startswith('torchvision:'):
        return 'dense'
    if args.pretrained == 'torchvision':
        return 'torchvision'
    ckpt = torch.load(args.pretrained, map_location='cpu', weights_only=True, mmap=True)
    return 'dense' if isinstance(ckpt, dict) and 'widths' in ckpt and 'state_dict' in ckpt else 'torchvision'


def build_costs(net, args, names):
    """Every cost of `net` (a `Prunable`) that the budget `names`, as a black box C(widths) -> fraction of the dense
    network, in the budget's order, with the dense network's own value of each (for absolute budgets and the
    report): params and macs (exact), latency (measured) and the --cost files."""
    costs = net.costs([n for n in names if n in COSTS])
    dense = dict(zip(COSTS, count(net.plain, net.input_shape)))
    for spec in args.cost:
        name, cost = user_cost(spec, net.widths, net.names)
        costs[name], dense[name] = cost, cost.dense
    if 'latency' in names:
        costs['latency'] = latency_cost(net, args)
        dense['latency'] = costs['latency'].dense
    return {n: costs[n] for n in names}, dense


def load_dense(path, model):
    """Weights of the dense checkpoint at `path` into `model`, and the input statistics it was trained with."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model.load_state_dict(ckpt['state_dict'] if isinstance(ckpt, dict) and 'state_dict' in ckpt else ckpt)
    except Exception as e:
        fail(f"--pretrained {path}: cannot load it into the dense network ({type(e).__name__}: {first_line(e)})")
    return {k: torch.tensor(ckpt[k]) for k in ('mean', 'std') if ckpt.get(k) is not None}


RUN_FILES = ('results.json', 'dense.pt', 'pruned.pt', 'checkpoint.pt', 'metrics.csv', 'policy.pt', 'tensorboard')
EXPORTS = ('pruned.onnx', 'pruned.pt2', 'pruned.json')  # what --export may write into the run folder


class Pipeline:
    """What `python crl_prune.py` runs: one method per phase, in order (`__init__` checks, `load`, `dense`, `prune`,
    `finetune`, `report`, `export`); a resumed run skips what its checkpoint holds."""

    def __init__(self, args):
        """Every check that needs no data: device, output folder, the network, its costs, the budget's feasibility
        (stage 1)."""
        self.args, self.path = args, lambda name: os.path.join(args.out, name)
        self.device = start_processes(args)
        self.rank, self.world = rank_and_world()
        self.main = self.rank == 0  # process 0 writes files and prints; under torchrun the others stay quiet
        self.metrics = None
        if not self.main:
            sys.stdout = open(os.devnull, 'w')
        self.numerics = Numerics(self.device, args.bf16, args.channels_last)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            fail(f"--out {args.out} is a file; choose a directory")
        if args.resume and os.path.exists(self.path('results.json')):
            fail(f"--resume: the run in {args.out} has finished already (results.json)")
        if not (args.overwrite or args.resume) and any(os.path.exists(self.path(f)) for f in RUN_FILES + EXPORTS):
            fail(f"--out {args.out} already holds results" + (' of an unfinished run: pass --resume to continue it,'
                 if os.path.exists(self.path('checkpoint.pt')) else ';') + " pass --overwrite to replace them or "
                 "choose another --out")
        self.checkpoint = Checkpoint(args)
        classes = len(image_folder_splits(args.data)[2]) if args.data else {'cifar10': 10, 'cifar100': 100}[
            args.dataset]
        torch.manual_seed(args.seed)
        if args.compile:  # each run compiles its own networks: without this a process that calls main() many times
            torch._dynamo.reset()  # (bench/compare.py) reaches Dynamo's recompile limit and silently runs eagerly
        size, note = image_size(args)
        if note:
            print(f"note: {note}")
        self.input_shape = (3, size, size)
        self.pretrained = pretrained_kind(args)
        weights = torchvision_weights(args) if self.pretrained == 'torchvision' else None
        self.net = network(args.arch, args.width, classes, self.input_shape, weights)
        self.model = self.net.model
        for note in self.net.notes:
            print(f"{args.arch}: {note}")
        # a pretrained network sees its inputs normalised as in its own training (torchvision's: ImageNet's)
        self.stats = load_dense(args.pretrained, self.net.plain) if self.pretrained == 'dense' else {
            'mean': IMAGENET_MEAN, 'std': IMAGENET_STD} if self.pretrained else {}
        # under torchrun: DistributedDataParallel runs the steps (it averages the weights' gradients), the rewards
        # and BN statistics are averaged over the processes
        self.reduce = all_reduce if self.world > 1 else None
        self.wrap = lambda model: (torch.compile if args.compile else (lambda m: m))(
            torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model)
        budget = parse_budget(args.budget, cost_names(args))
        costs, self.dense_cost = build_costs(self.net, args, list(budget))
        self.fractions = resolve_budget(budget, self.dense_cost)  # {name: fraction of the dense network}
        self.multiple = args.channel_multiple or (8 if self.device.type == 'cuda' else 1)
        self.costs, self.budget = checked_budget(self.fractions, costs, self.net, self.multiple)  # stage 1

    def callbacks(self, phase, total_steps):
        """Progress lines and metrics.csv rows, then checkpoints, as one callback of Part I's loops."""
        progress = Progress(phase, self.args.log_every, self.device, list(self.costs) if phase == 'prune' else (),
                            total_steps=total_steps, metrics=self.metrics)
        self.progress = progress
        return lambda event: (progress(event), self.checkpoint(event))

    def train(self, model, epochs, phase):
        """Part I's `train` on the training split, with this run's callbacks; returns the steady-state speed."""
        a = self.args
        batches = Batches(self.data, 'train', a.batch_size, train=True)
        train(model, batches, epochs, a.lr, weight_decay=a.wd, bf16=self.numerics.bf16, wrap=self.wrap,
              reduce=self.reduce, phase=phase, callback=self.callbacks(phase, epochs * len(batches)),
              resume=self.checkpoint.resume)
        return self.progress.speed()

    def load(self):
        """The data, on the device; the run folder (--overwrite: the replaced run's results go now)."""
        a, t0 = self.args, time.time()
        self.data = load_data(a, self.numerics, self.input_shape[-1])
        self.data.update(self.stats)  # a --pretrained network sees its inputs normalised as in its own training
        self.report = self.checkpoint.report  # what the finished phases measured, saved with every checkpoint
        self.report.setdefault('time_s', {})['data'] = time.time() - t0
        self.report.setdefault('speed', {})
        self.numerics.place(self.model)
        if self.main:
            os.makedirs(a.out, exist_ok=True)
            if not a.resume:  # so that an interrupted --overwrite can be resumed
                for path in filter(os.path.exists, map(self.path, ('results.json', 'checkpoint.pt', *EXPORTS))):
                    os.remove(path)
            self.metrics = Metrics(a.out, list(self.costs), a.tensorboard, self.checkpoint.saved)
        barrier()  # the others write nothing, and see the run folder only once it is ready
        d = self.data
        print(f"{a.arch}" + (f" width {a.width}" if a.arch in ARCHS else '') + f": {count(self.net.plain)[0]:,} "
              f"parameters, {len(d['train'])} train / {len(d['test'])} test images at {d['size']}x{d['size']} px "
              f"({'streamed by %d workers' % a.workers if d['streamed'] else 'in memory'}), {len(d['classes'])} "
              f"classes, {self.device}" + (f" x {self.world} processes" if self.world > 1 else '')
              + (f"; resuming after {self.checkpoint.saved[0]} epoch {self.checkpoint.saved[1]}"
                 if self.checkpoint.saved else ''))

    def save(self, model, name, widths):
        net = self.net
        if self.main:
            save_pruned(model, self.path(name), self.data['mean'], self.data['std'], self.data['classes'],
                        self.input_shape, width=self.args.width if name == 'dense.pt' else None, arch=net.arch,
                        num_classes=net.classes, widths=list(widths), group_names=net.names,
                        resize=resize_for(self.input_shape[-1], train=False),
                        cifar_stem=getattr(net.plain, 'cifar_stem', None))

    def dense(self):
        """Phase 1: the dense network: trained, or none to train with a --pretrained dense.pt, or torchvision's
        weights fine-tuned (their new classifier must learn the data's classes)."""
        if not self.checkpoint.reached('prune'):
            t0 = time.time()
            epochs = 0 if self.pretrained == 'dense' else self.args.dense_epochs
            self.report['speed']['dense'] = self.train(self.model, epochs, 'dense')
            self.report['time_s']['dense'] = time.time() - t0
            refuse_diverged(self.model, 'dense training')
            self.save(self.net.plain, 'dense.pt', self.net.widths)
            self.report['dense_accuracy'] = evaluate(self.model, self.data)
            if self.metrics:
                self.metrics.test_accuracy('dense', self.report['dense_accuracy'])
        print(f"dense accuracy {self.report['dense_accuracy']:.4f}")

    def prune(self):
        """Phase 2: CRL learns the keep-probabilities under the budget while the weights adapt (stage 2); then the
        final mask, compaction and BN recalibration (stage 3)."""
        a, report, numerics = self.args, self.report, self.numerics
        if self.checkpoint.reached('finetune'):  # resumed while fine-tuning: `train` restores the weights
            self.small = numerics.place(self.net.shrink(report['widths']))
            print(f"compact network kept {report['widths']}")
            return
        t0, k = time.time(), a.samples
        batches = Batches(self.data, 'train', max(a.batch_size // k, 1), train=True,  # as many images as a dense epoch
                          steps=max(len(self.data['train']) // (a.batch_size * self.world), 1))
        budget = self.budget.to(self.device)
        policy, lam = prune(self.model, self.costs, budget, batches, a.prune_epochs, samples=k, lr=a.prune_lr,
                            weight_decay=a.wd, policy_lr=a.policy_lr, dual_lr=a.dual_lr, damping=a.damping, lead=a.lead,
                            anneal=a.anneal, control_variate=a.control_variate,
                            policy=Policy(self.net.widths, a.init_keep), bf16=numerics.bf16, wrap=self.wrap,
                            reduce=self.reduce,
                            callback=self.callbacks('prune', a.prune_epochs * len(batches)),
                            resume=self.checkpoint.resume)
        report['speed']['prune'], report['time_s']['prune'] = self.progress.speed(), time.time() - t0
        if self.main:
            save_atomic({'theta': dict(zip(self.net.names, policy.split(policy.theta.detach().cpu())))},
                        self.path('policy.pt'))
        report['multipliers'] = dict(zip(self.costs, lam.tolist()))
        report['keep_probability_mean'] = torch.sigmoid(policy.theta).mean().item()
        report['expected_cost'] = dict(zip(self.costs, expected_cost(policy, self.costs).tolist()))
        small, mask = final_network(self.net, policy, self.costs, budget, self.multiple,
                                    Batches(self.data, 'train', a.batch_size, train=True), numerics.bf16, self.reduce)
        report['measured'] = {n: c.final for n, c in self.costs.items() if hasattr(c, 'measure')}
        report['widths'] = policy.kept(mask[None])[0].tolist()
        if a.reinit:  # keep the widths CRL found, train them from random initialisation (Liu et al., ICLR 2019)
            small = self.net.fresh(report['widths'])
        self.small = numerics.place(small)
        report['accuracy_before_finetune'] = evaluate(self.small, self.data)
        if self.metrics:
            self.metrics.test_accuracy('prune', report['accuracy_before_finetune'])
        print(f"compact network kept {report['widths']}; accuracy before fine-tuning "
              f"{report['accuracy_before_finetune']:.4f}")
        for name, cost in report['expected_cost'].items():
            if cost > 1.25 * self.fractions[name]:
                print(f"note: pruning ended with the policy's expected {name} at {cost:.3f} against a budget of "
                      f"{self.fractions[name]:.3f}; the final mask cut the difference by ranking alone. More "
                      f"--prune-epochs (or a larger --dual-lr) bring the policy to the budget.")

    def finetune(self):
        """Phase 3: fine-tuning of the compact network (--reinit: its training from scratch)."""
        t0 = time.time()
        self.report['speed']['finetune'] = self.train(self.small, self.args.finetune_epochs, 'finetune')
        self.report['time_s']['finetune'] = time.time() - t0
        identical(torch.stack([t.double().sum() for t in self.small.state_dict().values()]), 'networks')
        self.accuracy = evaluate(self.small, self.data)
        if self.metrics:
            self.metrics.test_accuracy('finetune', self.accuracy)
            self.metrics.close()
        self.save(self.small, 'pruned.pt', self.report['widths'])

    def report_results(self):
        """results.json (written atomically, replacing the checkpoint) and the summary lines."""
        a, report, net, small = self.args, self.report, self.net, self.small
        (dp, dm), (pp, pm) = count(net.plain, self.input_shape), count(small, self.input_shape)
        fractions = {'params': pp / dp, 'macs': pm / dm}  # counted on the compact network itself
        kept = torch.tensor([report['widths']])
        fractions.update({n: c(kept).item() for n, c in self.costs.items() if n not in COSTS})  # user costs...
        fractions.update({n: m['fraction'] for n, m in report['measured'].items()})  # ... measured ones as measured
        results = {
            'arch': a.arch, 'width': a.width, 'data': a.data or a.dataset, 'image_size': self.input_shape[-1],
            'streamed': self.data['streamed'], 'device': str(self.device), 'processes': self.world,
            'budget': self.fractions,
            'budget_absolute': {n: b * self.dense_cost[n] for n, b in self.fractions.items()},
            'budget_met': all(fractions[k] <= b for k, b in self.fractions.items()),
            'fractions': {n: fractions[n] for n in self.costs},
            'expected_cost_after_pruning': report.get('expected_cost'),
            'dense': {'params': dp, 'macs': dm, 'accuracy': report['dense_accuracy']},
            'pruned': {'params': pp, 'macs': pm, 'accuracy': self.accuracy,
                       'accuracy_before_finetune': report['accuracy_before_finetune'],
                       'params_fraction': fractions['params'], 'macs_fraction': fractions['macs']},
            'channels': dict(zip(net.names, report['widths'])), 'dense_channels': dict(zip(net.names, net.widths)),
            'keep_probability_mean': report['keep_probability_mean'], 'channel_multiple': self.multiple,
            'multipliers': report['multipliers'], 'time_s': report['time_s'],
            'images_per_s': {phase: s['images_per_s'] for phase, s in report['speed'].items()},
            'overhead_s': {phase: s['overhead_s'] for phase, s in report['speed'].items()},
            'args': vars(a),
        }
        for name, measured in report['measured'].items():  # what a measured cost records of the final network
            results[name], line = self.costs[name].results(measured, kept, self.fractions[name])
            print(line)
        if not self.main:  # the others return the same results and write nothing
            return results
        if a.speed:
            batch = a.speed_batch or (512 if self.device.type == 'cuda' else 64)
            results['speed'] = inference_speed(net.plain, small, self.numerics, self.input_shape, (1, batch),
                                               a.speed.split(','))
            print(speed_table(results['speed']))
        save_atomic(results, self.path('results.json'))
        if os.path.exists(self.path('checkpoint.pt')):
            os.remove(self.path('checkpoint.pt'))  # the run is complete: its results replace the checkpoint
        print(f"dense  {dp:,} params {dm:,} MACs accuracy {report['dense_accuracy']:.4f}\n"
              f"pruned {pp:,} params ({fractions['params']:.3f}) {pm:,} MACs ({fractions['macs']:.3f}) "
              f"accuracy {self.accuracy:.4f}; budget met: {results['budget_met']}; results in {a.out}")
        return results

    def export(self):
        """Last: an export that fails leaves every result of the run saved."""
        if not self.main:
            return
        exported = self.path('pruned.onnx' if onnx_available() else 'pruned.pt2')
        try:
            export_pruned(self.path('pruned.pt'), exported)
        except Exception as e:
            fail(f"--export to {exported} failed ({type(e).__name__}: {first_line(e)}); the run's results are saved "
                 f"in {self.args.out}")
        print(f"exported the pruned network to {exported}")


def main(argv=None):
    """The command line. Returns the results (as in results.json); bad input ends in one line on stderr and exit
    status 1, Ctrl-C in the command that resumes the run."""
    pipeline, finished = None, False
    try:
        args = parse_args(argv)
        pipeline = Pipeline(args)
        pipeline.load()
        pipeline.dense()
        pipeline.prune()
        pipeline.finetune()
        results = pipeline.report_results()
        if args.export:
            pipeline.export()
        finished = True
        return results
    except CRLError as e:
        raise SystemExit(f"crl_prune: error: {e}") from None
    except KeyboardInterrupt:
        if pipeline is None:
            raise
        words = [sys.argv[0], *sys.argv[1:]] if argv is None else [os.path.relpath(__file__), *argv]
        if pipeline.checkpoint.saved is None:  # nothing to continue from: the same command starts over
            command = shlex.join(['python', *words, *([] if args.overwrite else ['--overwrite'])])
            raise SystemExit(f"crl_prune: interrupted before the first checkpoint; start again with: {command}")
        command = shlex.join(['python', *words, *([] if args.resume else ['--resume'])])
        raise SystemExit(f"crl_prune: interrupted; {pipeline.checkpoint.describe()}; resume with: {command}")
    finally:  # a failed run's metrics.csv and TensorBoard files are closed too
        if getattr(pipeline, 'metrics', None):
            pipeline.metrics.close()
        if getattr(pipeline, 'world', 1) > 1:
            if not pipeline.main:
                sys.stdout.close()
                sys.stdout = sys.__stdout__
            end_processes(synced=finished)


if __name__ == '__main__':
    main()
