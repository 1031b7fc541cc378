"""Tests of crl_prune.py, on the CPU, on small data the tests make themselves."""
import csv
import inspect
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crl_prune as crl

HERE = os.path.dirname(os.path.abspath(__file__))


# The command line's tiny runs: VGG11 at width 1/16 on a folder of 36 training images (write_image_folder), batch 12,
# one epoch a phase, 2 masks a step.
TINY = ['--arch', 'vgg11', '--width', '0.0625', '--dense-epochs', '1', '--prune-epochs', '1',
        '--finetune-epochs', '1', '--batch-size', '12', '--samples', '2', '--log-every', '1']


@pytest.fixture
def tiny(tmp_path):
    return write_image_folder(tmp_path / 'data')


def tiny_run(data, out, *args):
    """`python crl_prune.py` with the TINY settings on the image folder `data`, into `out`: its results."""
    return crl.main([*TINY, '--data', str(data), '--out', str(out), *args])


def randomise_bn(model):
    """BN with non-trivial statistics and affine parameters, so that compaction must copy them right."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model


def random_mask(policy, keep=0.5):
    """A random 0/1 mask with at least one channel per group."""
    return torch.maximum((torch.rand(sum(policy.widths)) < keep).float(), crl.keep_top(policy, [1] * len(policy.widths)))


# --- Part I, 1-2. Masked networks and the two worked examples ---------------------------------------------------------

@pytest.mark.parametrize('arch', ['vgg11', 'resnet18'])
def test_masks_zero_exactly_the_masked_channels(arch):
    torch.manual_seed(0)
    model = randomise_bn(crl.build(arch, crl.dense_widths(arch, 0.125), 10)).train()
    policy = crl.Policy(crl.group_widths(model), 0.5)
    masks = policy.sample(2)  # two samples, two different masks
    outputs = []
    for u in crl.units(model):
        u.register_forward_hook(lambda u, i, o: outputs.append((u, o)))
    model(torch.randn(2, 3, 32, 32), list(policy.split(masks)))
    per_group = policy.split(masks)
    checked = 0
    for u, o in outputs:
        if u.out is None:
            continue
        o = o.view(2, o.shape[1], -1)
        dropped, kept = per_group[u.out] == 0, per_group[u.out] == 1
        assert (o[dropped] == 0).all()               # every masked channel is exactly zero ...
        assert (o[kept].abs().sum(-1) > 0).all()     # ... and no kept channel is
        checked += int(dropped.sum())
    assert checked > 0


@pytest.mark.parametrize('arch', crl.ARCHS)
def test_compaction_gives_the_masked_networks_outputs(arch):
    torch.manual_seed(1)
    model = randomise_bn(crl.build(arch, crl.dense_widths(arch, 0.125), 7))
    policy = crl.Policy(crl.group_widths(model), 0.5)
    mask = random_mask(policy)
    small = crl.compact(model, policy.split(mask))
    assert crl.group_widths(small) == policy.kept(mask).tolist()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    model.eval(), small.eval()
    x = torch.randn(5, 3, 32, 32)
    masked = model(x, [g[None] for g in policy.split(mask)])
    torch.testing.assert_close(small(x), masked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model(x), masked)  # the mask did change the outputs


@pytest.mark.parametrize('arch', ['vgg11', 'resnet18'])
def test_reward_of_a_mask_depends_on_that_mask_alone(arch):
    """In a training forward pass of K masks, sub-network k's outputs do not change with the other masks of the batch
    (minimal, full, copies of it, random), and equal what its compact network computes in training mode."""
    torch.manual_seed(5)
    model = randomise_bn(crl.build(arch, crl.dense_widths(arch, 0.125), 10)).train()
    policy = crl.Policy(crl.group_widths(model), 0.5)
    x = torch.randn(4, 3, 32, 32)
    mask = random_mask(policy)
    full = torch.ones_like(mask)
    outputs = []
    for others in ([crl.keep_top(policy, [1] * len(policy.widths))] * 3, [full] * 3, [mask] * 3, [random_mask(policy) for _ in range(3)]):
        masks = torch.stack([mask, *others])
        outputs.append(model(torch.cat([x] * 4), policy.split(masks))[:4])
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-5)
    small = crl.compact(model, policy.split(mask)).train()
    torch.testing.assert_close(small(x), outputs[0], rtol=1e-4, atol=1e-4)


def test_resnet_residual_sums_share_one_group():
    model = crl.build('resnet18', crl.dense_widths('resnet18'), 10)
    for block in model.blocks:
        assert block.conv1.out != block.conv2.out
        assert block.conv2.out == (block.shortcut.out if block.shortcut else block.conv1.inp)
    assert model.blocks[0].conv1.inp == model.stem.out == 0
    assert sorted({b.conv1.out for b in model.blocks}) == list(range(4, 12))


def test_per_slice_batch_norm_moves_the_running_variance_towards_the_unbiased_one():
    torch.manual_seed(14)
    bn = nn.BatchNorm2d(3, momentum=1.0).train()
    y = torch.randn(4 * 5, 3, 2, 2)
    crl.batch_norm_per_slice(bn, y, 4)
    slices = y.view(4, 5, 3, 2, 2)
    torch.testing.assert_close(bn.running_var, slices.var((1, 3, 4), correction=1).mean(0))
    torch.testing.assert_close(bn.running_mean, slices.mean((1, 3, 4)).mean(0))


# --- Part I, 3. Costs -------------------------------------------------------------------------------------------------

def test_dense_counts_match_the_published_figures():
    vgg = crl.build('vgg16', crl.dense_widths('vgg16'), 10)
    params, macs = crl.count(vgg)
    assert params == 14_987_210            # about 14.99M, BN and classifier included
    assert macs == 313_463_808             # 313.5M (conv and linear), HRank: 313.73M
    resnet = crl.build('resnet18', crl.dense_widths('resnet18'), 10)
    params, macs = crl.count(resnet)
    assert params == 11_173_962            # about 11.17M
    assert round(macs / 1e9, 2) == 0.56    # 0.56G


def test_measure_is_an_independent_count():
    # VGG11 with 4 channels everywhere and 2 classes, counted by hand: eight conv3x3 (no bias) each with BN(4),
    # then linear 4->4 (no bias), BN1d(4), linear 4->2 (with bias)
    m = crl.build('vgg11', [4] * 9, 2)
    conv_params = 3 * 4 * 9 + 7 * 4 * 4 * 9
    conv_macs = 3 * 4 * 9 * 32 * 32 + 4 * 4 * 9 * (16 * 16 + 8 * 8 * 2 + 4 * 4 * 2 + 2 * 2 * 2)
    assert crl.count(m) == (conv_params + 8 * 2 * 4 + 16 + 2 * 4 + 10, conv_macs + 16 + 8)


@pytest.mark.parametrize('arch', crl.ARCHS)
def test_costs_equal_counts_on_the_compact_network(arch):
    torch.manual_seed(2)
    model = crl.build(arch, crl.dense_widths(arch, 0.25), 10)
    costs = crl.make_costs(model, ['params', 'macs'])
    policy = crl.Policy(crl.group_widths(model), 0.5)
    dense_params, dense_macs = crl.count(model)
    masks = torch.stack([random_mask(policy, keep) for keep in (0.1, 0.5, 0.9)])
    for mask, p, m in zip(masks, costs['params'](policy.kept(masks)), costs['macs'](policy.kept(masks))):
        params, macs = crl.count(crl.compact(model, policy.split(mask)))
        assert p.item() == pytest.approx(params / dense_params, abs=1e-12)
        assert m.item() == pytest.approx(macs / dense_macs, abs=1e-12)
    full = torch.tensor([crl.group_widths(model)])
    assert costs['params'](full).item() == 1.0 and costs['macs'](full).item() == 1.0


# --- Part I, 4-6. The policy, REINFORCE, the dual step ----------------------------------------------------------------

def test_dual_step_raises_over_budget_and_falls_to_zero_under():
    budget = torch.tensor([0.2], dtype=torch.float64)
    integral = lam = torch.zeros(1, dtype=torch.float64)
    for _ in range(10):
        integral, new = crl.dual_step(integral, torch.tensor([0.5], dtype=torch.float64), budget, 0.1, 1.0)
        assert new > lam
        lam = new
    for _ in range(200):
        integral, new = crl.dual_step(integral, torch.tensor([0.1], dtype=torch.float64), budget, 0.1, 1.0)
        assert new <= lam
        lam = new
    assert lam.item() == 0 and integral.item() == 0  # projected: never negative


def test_the_integral_takes_over_the_proportional_terms_offset():
    """A stand-in for the policy whose cost moves 5% a step towards b (1 + (4 - lambda) / 8): it meets the budget
    only under lambda = 4. The proportional term alone holds it 3.7% over the budget (lambda = damping * e needs
    e > 0); with `prune`'s default eta the integral takes that offset over, to within 1.2% after 3,000 steps (about
    10 epochs of 300 steps), which eta = 0.01 does not."""
    defaults = inspect.signature(crl.prune).parameters

    def offset(eta, steps=3000):
        budget, cost, integral = torch.tensor([0.1], dtype=torch.float64), 0.13, torch.zeros(1, dtype=torch.float64)
        for _ in range(steps):
            integral, lam = crl.dual_step(integral, torch.tensor([cost], dtype=torch.float64), budget, eta,
                                          defaults['damping'].default)
            cost += 0.05 * (0.1 * (1 + (4 - lam.item()) / 8) - cost)
        return cost / 0.1 - 1
    assert offset(0) == pytest.approx(4 / (8 + defaults['damping'].default), abs=0.002)
    assert abs(offset(defaults['dual_lr'].default)) < 0.012 < 0.025 < offset(0.01)


def adam_policy_under_dual_steps(lead, steps=300, channels=100, noise=10.0, seed=0):
    """A stand-in for the pruning loop: keep-probabilities p = sigmoid(theta) from 0.9, moved by Adam (the policy's
    optimiser, lr 0.2) on minus the Lagrangian, lambda * mean(p) - 0.02 mean(p) (keeping channels pays a little), plus
    noise in every gradient (REINFORCE's); the multiplier from `dual_step` against a budget of 0.25 with `prune`'s
    defaults and the drift as `prune` computes it. Returns the cost after every step."""
    defaults = inspect.signature(crl.prune).parameters
    generator = torch.Generator().manual_seed(seed)
    theta = torch.full((channels,), math.log(9), requires_grad=True)
    opt = torch.optim.Adam([theta], 0.2)
    budget, integral = torch.tensor([0.25], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    lam, before, costs = integral.clone(), torch.tensor([0.9], dtype=torch.float64), []
    for _ in range(steps):
        p = torch.sigmoid(theta)
        opt.zero_grad()
        (lam.item() * p.mean() - 0.02 * p.mean()).backward()
        theta.grad += noise * torch.randn(channels, generator=generator) / channels
        opt.step()
        cost = torch.sigmoid(theta).mean().detach().double().view(1)
        integral, lam = crl.dual_step(integral, cost, budget, defaults['dual_lr'].default,
                                      defaults['damping'].default, lead * (cost - before))
        before = cost
        costs.append(cost.item())
    return costs


def test_the_lead_brakes_the_policy_before_it_coasts_under_the_budget():
    """With the proportional term on the current cost, Adam's momentum carries the policy from 0.9 to under 0.1, 60%
    under the budget of 0.25, where nothing pulls it back for long; on the cost predicted `lead` steps on (`prune`'s
    default) it stays within 30% of it once there, and at the budget by the end."""
    lead = inspect.signature(crl.prune).parameters['lead'].default
    coasting, braked = adam_policy_under_dual_steps(0), adam_policy_under_dual_steps(lead)
    assert min(coasting) < 0.1
    there = next(t for t, c in enumerate(braked) if c < 0.275)
    assert there < 50 and min(braked[there:]) > 0.7 * 0.25 and braked[-1] == pytest.approx(0.25, rel=0.1)


def test_reinforce_learns_which_channels_pay():
    torch.manual_seed(0)
    policy = crl.Policy([6, 4], 0.5)
    value = torch.tensor([1., 1, 1, -1, -1, -1, 1, -1, 1, -1])  # keeping channel c earns value[c]
    opt = torch.optim.Adam(policy.parameters(), 0.1)
    none = torch.zeros(0, dtype=torch.float64)
    for _ in range(300):
        masks = policy.sample(8)
        loss = crl.reinforce_loss(policy, masks, masks @ value, torch.zeros(8, 0, dtype=torch.float64), none, none)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.sigmoid(policy.theta)
    assert (p[value > 0] > 0.9).all() and (p[value < 0] < 0.1).all()


def test_reinforce_baseline_is_the_mean_of_the_other_masks():
    """The gradient of reinforce_loss is -1/K sum_k (L_k - b_k) grad log pi(m_k) with b_k the mean Lagrangian of
    the other K-1 masks (leave-one-out: unbiased, and lower variance than no baseline)."""
    torch.manual_seed(16)
    policy = crl.Policy([5, 3], 0.5)
    policy.theta.data.normal_()
    masks, reward = policy.sample(6), torch.randn(6)
    cost, budget, lam = torch.rand(6, 2).double(), torch.tensor([0.3, 0.5]).double(), torch.tensor([2.0, 0.5]).double()
    crl.reinforce_loss(policy, masks, reward, cost, budget, lam).backward()
    lagrangian = reward.double() - (cost - budget) @ lam
    expected = torch.zeros_like(policy.theta)
    for k in range(6):
        baseline = (lagrangian.sum() - lagrangian[k]) / 5
        score = torch.autograd.grad(policy.log_prob(masks[k:k + 1]).sum(), policy.theta)[0]
        expected -= (lagrangian[k] - baseline).float() * score / 6
    torch.testing.assert_close(policy.theta.grad, expected)


def test_lagrangian_meets_a_budget_with_the_most_valuable_channels():
    """Every channel is worth keeping, some more than others, but only 30% may be kept: the multiplier must rise
    until the expected cost sits at the budget, and the kept channels must be the valuable ones."""
    torch.manual_seed(0)
    policy = crl.Policy([20], 0.9)
    value = torch.linspace(0.01, 0.2, 20)
    cost = {'share': lambda kept: kept[:, :1].double() / 20}
    budget = torch.tensor([0.3], dtype=torch.float64)
    opt = torch.optim.Adam(policy.parameters(), 0.05)
    integral = lam = torch.zeros(1, dtype=torch.float64)
    expected = []
    for _ in range(1500):
        masks = policy.sample(16)
        c = cost['share'](policy.kept(masks))
        loss = crl.reinforce_loss(policy, masks, masks @ value, c, budget, lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
        integral, lam = crl.dual_step(integral, c.mean(0), budget, 0.01, 1.0)
        expected.append(torch.sigmoid(policy.theta).mean().item())
    assert lam.item() > 0
    assert abs(sum(expected[-300:]) / 300 - 0.3) < 0.05
    kept = crl.final_mask(policy, cost, budget)
    assert kept.sum() == 6 and kept[-6:].sum() >= 5  # the budget is used, mostly by the most valuable channels


# --- Part I, 7-8. The pruning loop on a toy task; the final mask ------------------------------------------------------

class SignalToy(nn.Module):
    """One group of 8 channels: channel c passes one colour plane's mean to a linear classifier. Channels 0 and 1
    see the plane that holds the label, channels 2-7 the two planes of noise."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.register_buffer('proj', torch.zeros(3, 8).index_put_((torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]),
                                                                   torch.arange(8)), torch.tensor(1.)))

    def forward(self, x, masks=None):
        h = x.mean((2, 3)) @ self.proj
        if masks is not None:  # slice k of the batch under mask k
            h = (h.view(len(masks[0]), -1, 8) * masks[0][:, None]).flatten(0, 1)
        return self.head(h)


def signal_data(n=512):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    x[:, 0] = (60 + 120 * y).view(n, 1, 1).to(torch.uint8)  # the label's plane
    x[:, 1:] = torch.randint(0, 256, (n, 2, 1, 1), generator=g, dtype=torch.uint8)  # noise
    split = crl.InMemory(x, y, torch.device('cpu'))
    return {'train': split, 'test': split, 'classes': 2, 'mean': x.float().mean((0, 2, 3)) / 255,
            'std': x.float().std((0, 2, 3)) / 255, 'size': 32, 'streamed': False,
            'numerics': crl.Numerics(torch.device('cpu'))}


class Shuffled:
    """What Part I's loops take: a re-iterable of (images, labels) batches with a len; here `steps` batches of
    `size` images of (x, y), reshuffled every pass."""

    def __init__(self, x, y, size, steps):
        self.x, self.y, self.size, self.steps = x, y, size, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        order = torch.randperm(len(self.y))
        for b in range(self.steps):
            yield self.x[order[b * self.size:(b + 1) * self.size]], self.y[order[b * self.size:(b + 1) * self.size]]


def signal_images(n=512):
    """signal_data's images normalised, and their labels: Part I's input, without Part II's data path."""
    data = signal_data(n)
    x, y = data['train'].x, data['train'].labels
    return (x.float() / 255 - data['mean'].view(1, 3, 1, 1)) / data['std'].view(1, 3, 1, 1), y


def test_pruning_phase_keeps_the_channels_that_carry_the_signal():
    """The whole pruning loop (pruning_step, REINFORCE, the policy's optimiser, the dual step, the weights' SGD) on a
    task where two of eight channels carry the label and the budget allows a quarter of them: the policy must keep a
    signal channel, the multiplier must push the noise channels out, and the weights must learn the task."""
    torch.manual_seed(0)
    (x, y), model, policy = signal_images(), SignalToy(), crl.Policy([8], 0.9)
    costs = {'share': lambda kept: kept[:, 0].double() / 8}
    budget = torch.tensor([0.25], dtype=torch.float64)
    lams = []
    real_dual_step = crl.dual_step
    with pytest.MonkeyPatch.context() as mp:  # record the multiplier at every step
        mp.setattr(crl, 'dual_step', lambda *a: lams.append(real_dual_step(*a)[1].item()) or real_dual_step(*a))
        crl.prune(model, costs, budget, Shuffled(x, y, 8, steps=8), 30, samples=8, policy=policy)
    p = torch.sigmoid(policy.theta.detach())
    assert p[:2].max() > 0.9 and p[2:].max() < 0.5, p
    assert max(lams[:20]) > 0 and len(lams) == 30 * 8  # over budget at first: the multiplier rises, every step
    assert crl.final_mask(policy, costs, budget)[:2].sum() >= 1
    model.eval()
    assert (model(x, [torch.tensor([[1., 1, 0, 0, 0, 0, 0, 0]])]).argmax(1) == y).float().mean() > 0.95


def expected_share(event):
    return torch.sigmoid(event['objects']['policy'].theta.detach()).mean().item()


@pytest.mark.parametrize('epochs', [1, 3])
def test_short_pruning_reaches_its_budget_on_the_toy_task(epochs):
    """36 steps in all (one epoch or three), about a seventh of the test above: the policy's expected cost must be
    within 10% of the budget by two thirds of them and stay there (plain REINFORCE with the budget from the first
    step was at 0.47 two thirds into 30 steps)."""
    torch.manual_seed(0)
    (x, y), model, policy = signal_images(), SignalToy(), crl.Policy([8], 0.9)
    costs = {'share': lambda kept: kept[:, 0].double() / 8}
    expected = []
    crl.prune(model, costs, [0.25], Shuffled(x, y, 8, steps=36 // epochs), epochs, policy=policy,
              callback=lambda e: e['step'] and expected.append(expected_share(e)))
    assert len(expected) == 36 and max(expected[23:]) < 0.275, expected


def test_the_budget_is_annealed_from_the_policys_expected_cost():
    """The dual step sees b_t = b_0^(1-s) b^s: b_0 the initial policy's expected cost (7 of 8 channels), falling
    geometrically to the budget at a sixth of the steps, the budget itself after."""
    torch.manual_seed(0)
    (x, y), model, targets = signal_images(), SignalToy(), []
    real_dual_step = crl.dual_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crl, 'dual_step', lambda i, c, b, *a: targets.append(b.item()) or real_dual_step(i, c, b, *a))
        crl.prune(model, {'share': lambda kept: kept[:, 0].double() / 8}, [0.25], Shuffled(x, y, 8, steps=10), 3,
                  policy=crl.Policy([8], 0.9))
    assert len(targets) == 30 and targets[:5] == pytest.approx([0.875 ** (1 - s / 5) * 0.25 ** (s / 5)
                                                                for s in range(1, 6)])
    assert targets[4:] == pytest.approx([0.25] * 26)


def test_the_proportional_term_looks_ahead_by_the_policys_last_step():
    """`prune` hands the dual step drift = lead * (the change of the policy's expected cost over the step just taken),
    the first step's from the initial policy's."""
    torch.manual_seed(0)
    (x, y), model, policy = signal_images(), SignalToy(), crl.Policy([8], 0.9)
    costs = {'share': lambda kept: kept[:, 0].double() / 8}
    drifts, expected = [], [crl.expected_cost(policy, costs).item()]
    real_dual_step = crl.dual_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crl, 'dual_step', lambda *a: drifts.append(a[5].item()) or real_dual_step(*a))
        crl.prune(model, costs, [0.25], Shuffled(x, y, 8, steps=10), 2, policy=policy, lead=3.0,
                  callback=lambda e: e['step'] and expected.append(crl.expected_cost(policy, costs).item()))
    assert len(drifts) == 20 and drifts == pytest.approx([3 * (b - a) for a, b in zip(expected, expected[1:])])
    assert min(drifts) < 0


class Noisy(Shuffled):
    """The same `steps` batches every pass, each also drawing `extra` numbers from the global random stream (as one
    process's data pipeline might and another's not)."""

    def __init__(self, *a, extra=0):
        super().__init__(*a)
        self.extra = extra

    def __iter__(self):
        for b in range(self.steps):
            torch.rand(self.extra)
            yield self.x[b * self.size:(b + 1) * self.size], self.y[b * self.size:(b + 1) * self.size]


def test_masks_depend_on_the_step_alone_not_on_the_global_random_stream():
    """Processes of a torchrun run draw the same K masks every step although their data pipelines use the global
    stream differently: the masks of step t come from a generator seeded with the run's seed + t. Under
    `reduce` (the rewards averaged over processes) the policies of the two runs stay identical too."""
    (x, y) = signal_images(64)
    runs = []
    for extra in (0, 5):
        torch.manual_seed(3)
        model, policy, masks = SignalToy(), crl.Policy([8], 0.7), []
        real = policy.sample
        policy.sample = lambda n, generator=None: masks.append(real(n, generator)) or masks[-1]
        crl.prune(model, {'share': lambda kept: kept[:, 0].double() / 8}, [0.5], Noisy(x, y, 8, 4, extra=extra),
                  2, samples=4, policy=policy, reduce=lambda t: t)
        runs.append((torch.stack(masks), policy.theta.detach().clone()))
    assert len(runs[0][0]) == 8 and len({m.tolist().__repr__() for m in runs[0][0]}) > 1  # masks change per step
    assert torch.equal(runs[0][0], runs[1][0])  # ... but not with the global stream
    assert torch.equal(runs[0][1], runs[1][1]) and not torch.equal(runs[0][1], crl.Policy([8], 0.7).theta)


def test_control_variate_leaves_the_gradient_unbiased_and_removes_a_linear_costs_noise():
    """With a cost linear in the kept widths, its first-order expansion is exact: every sample then gives the exact
    gradient of lambda E[C]; for a nonlinear cost the gradient's mean over many samples is unchanged."""
    torch.manual_seed(0)
    policy = crl.Policy([30, 20], 0.7)
    policy.theta.data += 0.5 * torch.randn(50)
    lam, none = torch.tensor([2.0], dtype=torch.float64), torch.zeros(8)

    def grad(masks, cost, slopes):
        policy.theta.grad = None
        crl.reinforce_loss(policy, masks, none, cost(policy.kept(masks))[:, None], torch.zeros(1), lam,
                           slopes).backward()
        return policy.theta.grad.clone()

    linear = lambda kept: (kept[:, 0] / 30 + 2 * kept[:, 1] / 20).double() / 3  # noqa: E731
    slopes = crl.cost_slopes(policy, {'c': linear})
    p = torch.sigmoid(policy.theta.detach())
    exact = 2.0 * p * (1 - p) * torch.cat([torch.full((30,), 1 / 90), torch.full((20,), 2 / 60)])
    assert torch.allclose(grad(policy.sample(8), linear, slopes), exact.float(), atol=1e-6)
    bilinear = lambda kept: (kept[:, 0] * kept[:, 1]).double() / 600  # noqa: E731
    slopes = crl.cost_slopes(policy, {'c': bilinear})
    g = [torch.stack([grad(m, bilinear, sl) for m in [policy.sample(8) for _ in range(3000)]]) for sl in (slopes, None)]
    assert torch.allclose(g[0].mean(0), g[1].mean(0), atol=4 * g[1].std(0).max().item() / 3000 ** 0.5)
    assert g[0].std(0).mean() < 0.5 * g[1].std(0).mean()  # and its noise is much smaller


@pytest.mark.parametrize('arch', ['vgg16', 'resnet18'])
def test_final_mask_meets_and_uses_random_budgets(arch):
    torch.manual_seed(3)
    model = crl.build(arch, crl.dense_widths(arch, 0.25), 10)
    costs = crl.make_costs(model, ['params', 'macs'])
    policy = crl.Policy(crl.group_widths(model), 0.5)
    for trial in range(10):
        policy.theta.data.normal_(0, 2)
        budget = torch.empty(2, dtype=torch.float64).uniform_(0.02, 0.9)
        mask = crl.final_mask(policy, costs, budget)
        kept = policy.kept(mask[None])
        assert (kept >= 1).all()
        within = [c(kept).item() <= b for c, b in zip(costs.values(), budget.tolist())]
        assert all(within)
        # the budget is used: the next channel in the ranking would break it
        order = torch.sigmoid(policy.theta).argsort(descending=True)
        nxt = next(i for i in order.tolist() if mask[i] == 0)
        more = mask.clone()
        more[nxt] = 1
        assert not crl.allowed(costs, budget, policy.kept(more[None]))[0]


@pytest.mark.parametrize('arch', ['vgg16', 'resnet18'])
def test_final_mask_keeps_multiples_of_eight_within_the_budget(arch):
    """The GPU default: every group keeps a multiple of 8 channels, its most probable ones, within every budget."""
    torch.manual_seed(4)
    model = crl.build(arch, crl.dense_widths(arch), 10)
    costs = crl.make_costs(model, ['params', 'macs'])
    policy = crl.Policy(crl.group_widths(model), 0.5)
    for trial in range(3):
        policy.theta.data.normal_(0, 2)
        budget = torch.empty(2, dtype=torch.float64).uniform_(0.05, 0.6)
        mask = crl.final_mask(policy, costs, budget, multiple=8)
        kept = policy.kept(mask[None])
        assert (kept % 8 == 0).all() and (kept >= 8).all() and crl.allowed(costs, budget, policy.kept(mask[None]))[0]
        for g, theta in enumerate(policy.split(policy.theta.detach())):  # the kept ones are the group's most probable
            k = kept[0, g].item()
            assert set(policy.split(mask)[g].nonzero().squeeze(1).tolist()) == set(theta.topk(k).indices.tolist())
        # the budget is used at least as well as by rounding down the plain rule's widths
        plain = policy.kept(crl.final_mask(policy, costs, budget)[None])[0].tolist()
        assert all(k >= r for k, r in zip(kept[0].tolist(), crl.rounded(policy.widths, plain, 8)))


def test_final_mask_finds_the_longest_prefix_when_the_cost_is_not_monotone():
    policy = crl.Policy([8], 0.5)
    policy.theta.data = torch.arange(8.)  # channel 7 most probable, channel 0 least
    spiky = {'spiky': lambda kept: torch.where(kept[:, 0] == 4, 2.0, kept[:, 0] / 8).double()}  # 4 channels: over
    mask = crl.final_mask(policy, spiky, torch.tensor([0.9], dtype=torch.float64))
    assert mask.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]  # 7 channels, past the spike; bisection would stop at 3


def test_final_mask_rejects_an_infeasible_budget():
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.25), 10)
    costs = crl.make_costs(model, ['params'])
    with pytest.raises(crl.CRLError, match='smallest network'):
        crl.final_mask(crl.Policy(crl.group_widths(model), 0.5), costs, torch.tensor([1e-5], dtype=torch.float64))


# --- Part I, 7. The loops in a GPU's settings (bf16, channels_last), run on the CPU -----------------------------------

@pytest.mark.parametrize('arch', ['vgg11', 'resnet18'])
def test_pruning_step_in_bf16_and_channels_last(arch):
    """The settings a GPU run uses (bf16 autocast, channels_last), forced on the CPU: the images stay channels_last,
    each mask is applied exactly, the losses are finite float32, the costs exact float64, and the compact network
    gives the masked network's outputs within bf16 tolerance."""
    torch.manual_seed(0)
    model = randomise_bn(crl.build(arch, crl.dense_widths(arch, 0.125), 10)).to(memory_format=torch.channels_last)
    policy = crl.Policy(crl.group_widths(model), 0.5)
    costs = crl.make_costs(model, ['params', 'macs'])
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (3,))
    seen = {}
    first = crl.units(model)[0]
    first.layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], dtype=o.dtype))
    last = {}
    for u in crl.units(model):
        if u.out is not None:
            u.register_forward_hook(lambda m, i, o: last.update({m: o}))
    numerics = crl.Numerics(torch.device('cpu'), 'on', 'on')
    assert (numerics.device, numerics.bf16, numerics.channels_last) == (torch.device('cpu'), True, True)
    opt_w, opt_p = torch.optim.SGD(model.parameters(), 0.01), torch.optim.Adam(policy.parameters(), 0.1)
    budget, lam = torch.tensor([0.5, 0.5]).double(), torch.ones(2).double()
    before = [p.detach().clone() for p in (first.layer.weight, policy.theta)]
    loss, logits, cost = crl.pruning_step(model, policy, costs, budget, lam, x, y, opt_w, opt_p, 4, bf16=True)
    assert seen['x'].is_contiguous(memory_format=torch.channels_last) and seen['dtype'] == torch.bfloat16
    assert torch.equal(seen['x'][3:6].float(), x) and len(seen['x']) == 12  # slice k holds the batch, unchanged
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and logits.shape == (12, 10)
    assert cost.dtype == torch.float64 and cost.shape == (4, 2)
    assert all(not torch.equal(b, p) for b, p in zip(before, (first.layer.weight, policy.theta)))  # both stepped
    assert lam.tolist() == [1.0, 1.0]  # the step reads the multipliers; the loop's dual step updates them
    # which mask was applied to which slice is not returned: recover it from the outputs, zero exactly where masked
    for u, o in last.items():
        on = (o.float().reshape(12, o.shape[1], -1).abs().sum(-1) > 0).view(4, 3, -1)
        assert (on == on[:, :1]).all()  # one mask per slice of three images
    # the compact network equals the masked one, in bf16
    mask = random_mask(policy)
    small = crl.compact(model, policy.split(mask)).to(memory_format=torch.channels_last)
    model.eval(), small.eval()
    with numerics.autocast():
        masked = model(x, [g[None] for g in policy.split(mask)]).float()
        compact = small(x).float()
    torch.testing.assert_close(compact, masked, rtol=0.05, atol=0.05 * masked.abs().max().item())


def test_kept_widths_and_costs_are_exact_for_many_masks():
    torch.manual_seed(3)
    model = crl.build('resnet18', crl.dense_widths('resnet18', 0.25), 10)
    policy = crl.Policy(crl.group_widths(model), 0.5)
    masks = policy.sample(64)
    kept = policy.kept(masks)
    assert kept.dtype == torch.long
    assert kept.tolist() == [[int(g.sum()) for g in policy.split(m)] for m in masks]
    # the matrix form of the costs against a direct count of the compact networks
    costs = crl.make_costs(model, ['params', 'macs'])
    dense = crl.count(model)
    for i in (0, 17, 63):
        counts = crl.count(crl.build('resnet18', kept[i].tolist(), 10))
        assert [costs[c](kept[i:i + 1]).item() * d for c, d in zip(costs, dense)] == pytest.approx(counts, rel=1e-12)


def test_compile_starts_every_run_from_a_fresh_dynamo_cache(tmp_path, tiny, monkeypatch):
    """bench/compare.py calls main() many times in one process: each run with --compile resets Dynamo, so the
    recompile limit is never reached (and the run never silently falls back to eager mode)."""
    calls = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: calls.append('compile') or model)
    monkeypatch.setattr(torch._dynamo, 'reset', lambda: calls.append('reset'))
    for run in range(2):
        tiny_run(tiny, tmp_path / str(run), '--compile')
    assert calls == ['reset', 'compile', 'compile', 'compile'] * 2


def test_end_to_end_tiny_run_in_bf16_and_channels_last(tmp_path, tiny):
    out = tmp_path / 'out'
    r = tiny_run(tiny, out, '--budget', 'params=0.4', '--bf16', 'on',
                  '--channels-last', 'on', '--speed', 'eager')
    assert r['budget_met'] and r['pruned']['params'] <= 0.4 * r['dense']['params']
    assert all(math.isfinite(r['pruned'][k]) for k in ('accuracy', 'accuracy_before_finetune'))
    assert set(r['images_per_s']) == set(r['overhead_s']) == {'dense', 'prune', 'finetune'}
    assert all(v > 0 for v in r['images_per_s'].values()) and all(v >= 0 for v in r['overhead_s'].values())
    small, _ = crl.load_pruned(out / 'pruned.pt')
    assert sum(p.numel() for p in small.parameters()) == r['pruned']['params']


# --- Part I, 9-10. Compaction and the library call: your own network (the README's example), depthwise convolutions

def readme_block(first_line):
    """The README's python code block whose first line is `first_line`."""
    text = open(os.path.join(HERE, 'README.md')).read()
    blocks = [b.split('```')[0] for b in text.split('```python\n')[1:]]
    return next(b for b in blocks if b.startswith(first_line))


@pytest.fixture(scope='module')
def own_network(tmp_path_factory):
    """The README's "Prune your own network" code, run as its user would: mynet.py prunes and saves, load_it.py
    loads the saved network in a fresh interpreter."""
    root = tmp_path_factory.mktemp('own')
    env = {**os.environ, 'PYTHONPATH': HERE}
    runs = {}
    for name in ('mynet.py', 'load_it.py'):
        (root / name).write_text(readme_block(f'# {name}'))
        runs[name] = subprocess.run([sys.executable, name], capture_output=True, text=True, cwd=root, env=env)
        assert runs[name].returncode == 0, runs[name].stderr
    sys.path.insert(0, str(root))
    try:
        import mynet
    finally:
        sys.path.remove(str(root))
    return root, mynet, runs


def test_readme_example_prunes_its_own_network_within_budget_and_reloads_elsewhere(own_network):
    root, mynet, runs = own_network
    user_lines = [line for name in ('mynet.py', 'load_it.py') for line in (root / name).read_text().splitlines()
                  if line.strip() and not line.strip().startswith('#')]
    assert len(user_lines) <= 40
    dense = mynet.MyNet()
    small, info = crl.load_pruned(root / 'mynet_pruned.pt', model=mynet.MyNet())
    (dp, dm), (sp, sm) = crl.count(dense), crl.count(small)
    assert sp <= 0.3 * dp and sm <= 0.5 * dm  # the budget {'params': 0.3, 'macs': 0.5}, met by the saved network
    assert info['widths'] == crl.group_widths(small) and info['group_names'] == ['stream', 'inner', 'wide']
    printed = runs['mynet.py'].stdout.split('\n')[0]
    assert printed == f"{info['widths']} {(sp, sm)}"  # the pruning process saw the network that was loaded
    assert runs['load_it.py'].stdout.strip() == f"{info['widths']} torch.Size([1, 10])"
    saved = torch.load(root / 'mynet_pruned.pt', weights_only=True)['state_dict']
    assert all(torch.equal(saved[k], v) for k, v in small.state_dict().items())


def test_own_network_costs_and_compaction_are_exact(own_network):
    """Residual addition and depthwise convolution: the cost functions equal the counts of the compact network, and
    the compact network computes what the masked one does."""
    _, mynet, _ = own_network
    torch.manual_seed(0)
    model = randomise_bn(mynet.MyNet()).eval()
    costs = crl.make_costs(model)
    policy = crl.Policy(crl.group_widths(model), 0.5)
    dense = crl.count(model)
    x = torch.randn(3, 3, 32, 32)
    for keep in (0.2, 0.5, 0.9):
        mask = random_mask(policy, keep)
        small = crl.compact(model, policy.split(mask))
        kept = policy.kept(mask[None])
        assert [costs[c](kept).item() * d for c, d in zip(costs, dense)] == pytest.approx(crl.count(small), rel=1e-12)
        torch.testing.assert_close(small(x), model(x, [g[None] for g in policy.split(mask)]), rtol=1e-4, atol=1e-5)
    assert small.dw.layer.groups == small.dw.layer.in_channels == small.dw.layer.out_channels == kept[0, 0]


class TwoConvs(nn.Module):
    """A plain conv on the image (never pruned), a Unit, then `tail` on the Unit's channels."""

    def __init__(self, tail):
        super().__init__()
        self.head = nn.Conv2d(3, 3, 1)
        self.unit = crl.Unit(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), None, 0)
        self.tail = tail

    def forward(self, x, masks=None):
        return self.tail(F.relu(self.unit(self.head(x), masks))).mean((2, 3))


def test_costs_count_layers_outside_units_and_refuse_ones_that_read_pruned_channels():
    model = TwoConvs(crl.Unit(nn.Conv2d(8, 4, 1), nn.Identity(), 0, None))
    costs, dense = crl.make_costs(model), crl.count(model)
    for k in (1, 5, 8):
        small = crl.Prunable(model).shrink([k])
        assert [costs[c](torch.tensor([[k]])).item() * d for c, d in zip(costs, dense)] == pytest.approx(
            crl.count(small), rel=1e-12)  # the plain head conv is a constant of both counts
    with pytest.raises(crl.CRLError, match='outside the Units'):
        crl.make_costs(TwoConvs(nn.Conv2d(8, 4, 1)))  # a plain conv reading group 0: compaction would break it


def test_grouped_and_depthwise_convolutions_are_checked():
    with pytest.raises(crl.CRLError, match='grouped convolution'):
        crl.Unit(nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8), 0, 1)
    with pytest.raises(crl.CRLError, match='one group'):
        crl.Unit(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), 0, 1)
    with pytest.raises(crl.CRLError, match='convolution or nn.Linear'):
        crl.Unit(nn.ConvTranspose2d(8, 8, 3), nn.BatchNorm2d(8), 0, 1)
    unit = crl.Unit(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), 0, 0)
    assert unit.dim_groups(unit.layer.weight) == [(0, 0)]  # its weight's dim 1 (one input channel) is no group
    with pytest.raises(crl.CRLError, match='group 0 has'):
        crl.group_widths(nn.Sequential(crl.Unit(nn.Conv2d(3, 8, 3), nn.Identity(), None, 0),
                                       crl.Unit(nn.Conv2d(4, 2, 3), nn.Identity(), 0, None)))


def test_prune_network_refuses_bad_budgets_before_any_training():
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 3)
    steps = []
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))]
    for budget, message in [({'flops': 0.1}, 'no cost named'), ({'params': 1.5}, 'in \\(0, 1\\]'),
                            ({'params': 1e-5}, 'infeasible'), ({}, 'no cost')]:
        with pytest.raises(crl.CRLError, match=message):
            crl.prune_network(model, batches, budget, callback=steps.append)
    assert steps == []


def test_prune_network_meets_a_users_cost_and_fine_tunes():
    torch.manual_seed(0)
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 3)
    data = signal_data(64)
    batches = crl.Batches(data, 'train', 8, train=True)
    energy = lambda w: (w.double() ** 2).sum(-1) / (torch.tensor(crl.group_widths(model)) ** 2).sum()  # noqa: E731
    events = []
    small = crl.prune_network(model, batches, {'energy': 0.3, 'params': 0.8}, costs={'energy': energy},
                              prune_epochs=1, finetune_epochs=1, samples=4, callback=events.append)
    assert energy(torch.tensor(crl.group_widths(small))).item() <= 0.3
    assert crl.count(small)[0] <= 0.8 * crl.count(model)[0]
    assert [(e['phase'], e['step']) for e in events] == [(p, s) for p in ('prune', 'finetune') for s in
                                                         [*range(1, 9), None]]
    assert all(e['cost'].shape == (4, 2) for e in events if e['phase'] == 'prune' and e['step'])


def test_training_ends_with_the_statistics_of_the_final_weights():
    """A short phase leaves BN's running averages far from the final network's statistics: `train` measures them
    afresh at its end."""
    torch.manual_seed(8)
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 2)
    first = crl.units(model)[0]
    with torch.no_grad():
        first.layer.weight.mul_(5)  # outputs of variance far from BN's initial running variance of 1
    data = signal_data(64)
    crl.train(model, crl.Batches(data, 'train', 32, train=True), 1, 1e-4)
    x = torch.cat([xb for xb, _ in crl.Batches(data, 'train', 64, train=False)])
    with torch.no_grad():
        out = first.layer(crl.augment(x))
    torch.testing.assert_close(first.bn.running_mean, out.mean((0, 2, 3)), atol=0.1, rtol=0.05)
    torch.testing.assert_close(first.bn.running_var, out.var((0, 2, 3)), atol=0.1, rtol=0.2)
    assert out.var((0, 2, 3)).mean() > 5  # two steps of momentum 0.1 alone would have left it near 1


@pytest.mark.parametrize('arch', ['vgg11', 'resnet18'])
def test_folded_bn_computes_what_the_network_computes(arch):
    torch.manual_seed(9)
    model = randomise_bn(crl.build(arch, crl.dense_widths(arch, 0.125), 10)).eval()
    folded = crl.fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # the original is kept
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_network_without_units_is_one_clear_error():
    import torchvision
    with pytest.raises(crl.CRLError, match='no crl_prune.Unit'):
        crl.prune_network(torchvision.models.resnet18(num_classes=2), [(torch.randn(2, 3, 32, 32),
                                                                        torch.zeros(2, dtype=torch.long))],
                          {'params': 0.5})


# --- Part II, 11. Data ------------------------------------------------------------------------------------------------

def test_batches_are_normalised_with_the_training_statistics():
    data = signal_data(64)
    x = torch.cat([xb for xb, _ in crl.Batches(data, 'train', 16, train=False)])
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)


def test_evaluate_uses_the_running_statistics():
    """Accuracy in eval mode: with BN running statistics far from the batch's own, train mode would differ."""
    torch.manual_seed(6)
    model = randomise_bn(crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 2))
    data = signal_data(200)
    x, y = next(iter(crl.Batches(data, 'test', 200, train=False)))
    expected = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert (model.train()(x).argmax(1) == y).float().mean().item() != expected  # the two modes disagree here
    assert crl.evaluate(model, data) == pytest.approx(expected)
    assert model.training  # and the model is left as it was found, training


def test_recalibrate_bn_measures_the_network_on_training_data():
    torch.manual_seed(7)
    model = randomise_bn(crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 2)).eval()
    crl.units(model)[1].bn.momentum = 0.01
    data = signal_data(256)
    crl.recalibrate_bn(model, crl.Batches(data, 'train', 256, train=True))
    assert not model.training and crl.units(model)[1].bn.momentum == 0.01  # left as it was found
    x = torch.cat([xb for xb, _ in crl.Batches(data, 'train', 256, train=False)])
    first = crl.units(model)[0]
    with torch.no_grad():
        out = first.layer(crl.augment(x))
    torch.testing.assert_close(first.bn.running_mean, out.mean((0, 2, 3)), atol=0.05, rtol=0.05)
    torch.testing.assert_close(first.bn.running_var, out.var((0, 2, 3)), atol=0.05, rtol=0.1)


def test_training_batches_are_augmented_and_test_batches_are_not():
    """Batches for training are shifted and flipped windows of the normalised images (`augment`); test batches are
    the normalised images themselves."""
    torch.manual_seed(17)
    data = signal_data(64)
    plain = torch.cat([xb for xb, _ in crl.Batches(data, 'train', 16, train=False)])
    y = data['train'].labels
    trained = list(crl.Batches(data, 'train', 16, train=True))
    assert len(trained) == 4 and all(len(xb) == 16 for xb, _ in trained)
    augmented = 0
    for xb, yb in trained:
        for a, label in zip(xb, yb):  # each training image is a window of some image of its class...
            padded = [torch.nn.functional.pad(p, (4, 4, 4, 4)) for p, c in zip(plain, y) if c == label]
            windows = [w[:, i:i + 32, j:j + 32] for w in padded for i in range(9) for j in range(9)]
            assert any(torch.allclose(a, w) or torch.allclose(a, w.flip(-1)) for w in windows)
            augmented += not any(torch.allclose(a, p) for p in plain)  # ... and most are not the image itself
    assert augmented > 32


def test_augment_is_a_shifted_possibly_flipped_window():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    out = crl.augment(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for a, p in zip(out, padded):
        windows = [p[:, i:i + 8, j:j + 8] for i in range(9) for j in range(9)]
        assert any(torch.equal(a, w) or torch.equal(a, w.flip(-1)) for w in windows)
    assert not torch.equal(out, x)


def write_image_folder(root, classes=3, train=12, test=6, size=32):
    """Tiny ImageFolder: each class a distinct colour plus noise, so a network can learn it."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', train), ('test', test)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
            for i in range(n):
                img = torch.rand(size, size, 3, generator=g) * 80
                img[..., c % 3] += 150
                Image.fromarray(img.byte().numpy()).save(os.path.join(root, split, f'class{c}', f'{i}.png'))
    return str(root)


def test_image_folder_loader(tmp_path):
    root = write_image_folder(tmp_path / 'data', size=40)
    args = crl.parse_args(['--data', root, '--batch-size', '16'])
    data = crl.load_data(args, crl.Numerics(torch.device('cpu')))
    x, y = data['train'].x, data['train'].labels
    assert x.shape == (36, 3, 32, 32) and x.dtype == torch.uint8
    assert data['classes'] == ['class0', 'class1', 'class2'] and sorted(y.unique().tolist()) == [0, 1, 2]
    assert data['test'].x.shape == (18, 3, 32, 32)
    assert (x[y == 1][:, 1].float().mean() > x[y == 1][:, 0].float().mean() + 100)  # labels follow the folders
    xb, yb = next(iter(crl.Batches(data, 'train', 8, train=True)))
    assert xb.shape == (8, 3, 32, 32) and abs(xb.mean().item()) < 1
    xb, yb = next(iter(crl.Batches(data, 'test', 6, train=False)))  # normalised with the training set's statistics
    mean, std = data['mean'].view(1, 3, 1, 1), data['std'].view(1, 3, 1, 1)
    torch.testing.assert_close(xb, (data['test'].x[:6].float() / 255 - mean) / std)
    assert torch.equal(yb, data['test'].labels[:6])


def write_sized_folder(root, sizes, classes=2, per_class=4):
    """An ImageFolder whose images have the given (width, height) sizes in turn, one class bright red, the other
    bright green, each with a vertical stripe 1/8 of the width from its left edge."""
    from PIL import Image
    import numpy as np
    i = 0
    for split in ('train', 'test'):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
            for n in range(per_class):
                w, h = sizes[i % len(sizes)]
                a = np.full((h, w, 3), 40, np.uint8)
                a[..., c] = 200 + 5 * n
                a[:, w // 8] = 255
                Image.fromarray(a).save(os.path.join(root, split, f'class{c}', f'{n}.png'))
                i += 1
    return str(root)


def test_image_size_is_the_datas_own_and_mixed_sizes_are_resized_with_a_note(tmp_path):
    same = write_sized_folder(tmp_path / 'same', [(48, 48)])
    assert crl.image_size(crl.parse_args(['--data', same])) == (48, None)
    assert crl.image_size(crl.parse_args([])) == (32, None)  # CIFAR
    mixed = write_sized_folder(tmp_path / 'mixed', [(64, 48), (40, 40), (56, 80)])
    size, note = crl.image_size(crl.parse_args(['--data', mixed]))
    assert size == 48 and '64x48' in note and 'centre-cropped to 48x48' in note and '--image-size' in note
    size, note = crl.image_size(crl.parse_args(['--data', mixed, '--image-size', '24']))
    assert size == 24 and 'resized' in note
    data = crl.load_data(crl.parse_args(['--data', mixed, '--batch-size', '4', '--samples', '2', '--loader', 'memory']),
                         crl.Numerics(torch.device('cpu')), 48)
    assert data['train'].x.shape == (8, 3, 48, 48) and data['test'].x.shape == (8, 3, 48, 48)


def test_decode_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    from PIL import Image
    import numpy as np
    a = np.zeros((40, 80, 3), np.uint8)  # 80 wide, 40 high: red left of the middle, green right, a blue stripe
    a[:, :40, 0], a[:, 40:, 1], a[:, 24:26] = 255, 255, (0, 0, 255)  # at columns 24-25
    Image.fromarray(a).save(tmp_path / 'wide.png')
    x = crl.decode(str(tmp_path / 'wide.png'), 20, 20).int()  # 40 x 20, then columns 10-29 of it
    assert x.shape == (3, 20, 20) and (x[0, :, 3:9] > 200).all() and (x[1, :, 11:] > 200).all()  # centred
    assert (x[2, :, 1:4] > 100).any()  # the stripe, at column 12 of 40
    x = crl.decode(str(tmp_path / 'wide.png'), 20, 40).int()  # 80 x 40 as it is, then columns 30-49
    assert (x[0, :, :9] > 200).all() and (x[1, :, 11:] > 200).all() and (x[2] < 50).all()  # the stripe cut off
    assert crl.resize_for(32, train=False) == 32 and crl.resize_for(224, train=False) == 256
    assert crl.resize_for(64, train=True) == 64 and crl.resize_for(64, train=False) == 73


def test_random_resized_crop_zooms_flips_and_keeps_the_size():
    torch.manual_seed(0)
    cols = torch.arange(64.).view(1, 1, 1, 64).expand(256, 3, 64, 64).contiguous()  # pixel value: its column
    whole = crl.random_resized_crop(cols, scale=(1, 1), ratio=(1, 1))  # the whole image, flipped or not
    assert whole.shape == cols.shape
    flipped = (whole[:, 0, 0, 0] > whole[:, 0, 0, -1])
    assert 80 < flipped.sum() < 176
    torch.testing.assert_close(whole[~flipped], cols[~flipped], atol=1e-3, rtol=0)
    torch.testing.assert_close(whole[flipped], cols[flipped].flip(-1), atol=1e-3, rtol=0)
    zoomed = crl.random_resized_crop(cols, scale=(0.25, 0.25), ratio=(1, 1))  # half the side: 32 columns spread
    span = (zoomed[:, 0, 0, 0] - zoomed[:, 0, 0, -1]).abs()
    assert ((span > 28) & (span < 34)).all()
    starts = torch.minimum(zoomed[:, 0, 0, 0], zoomed[:, 0, 0, -1])
    assert starts.min() < 8 and starts.max() > 24  # at random positions
    assert (crl.random_resized_crop(cols[:, :, :, :], scale=(0.08, 1)).std((1, 2, 3)) > 0).all()


def test_streaming_and_in_memory_paths_give_the_same_batches(tmp_path):
    """The two loaders decode with one function, normalise with the same statistics and produce the same test
    batches (at 48 px from 64-px images: the evaluation's resize and centre crop alike); both train."""
    root = write_image_folder(tmp_path / 'data', size=64)
    numerics = crl.Numerics(torch.device('cpu'))
    paths = {}
    for loader, workers in (('memory', '0'), ('stream', '0'), ('stream', '2')):
        args = crl.parse_args(['--data', root, '--batch-size', '8', '--samples', '2', '--loader', loader,
                               '--workers', workers])
        paths[loader, workers] = crl.load_data(args, numerics, 48)
    memory = paths['memory', '0']
    assert not memory['streamed'] and all(d['streamed'] for k, d in paths.items() if k[0] == 'stream')
    reference = [xb for xb, _ in crl.Batches(memory, 'test', 5, train=False)]
    assert reference[0].shape == (5, 3, 48, 48)
    for data in paths.values():
        torch.testing.assert_close(data['mean'], memory['mean'])
        torch.testing.assert_close(data['std'], memory['std'])
        got = list(crl.Batches(data, 'test', 5, train=False))
        assert len(got) == len(reference) == 4
        for (xb, yb), ref, labels in zip(got, reference, memory['test'].labels.split(5)):
            torch.testing.assert_close(xb, ref)
            assert torch.equal(yb, labels)
        trained = list(crl.Batches(data, 'train', 8, train=True))
        assert len(trained) == 4 and all(xb.shape == (8, 3, 48, 48) for xb, _ in trained)
    streamed = paths['stream', '2']
    subsets = [crl.load_data(crl.parse_args(['--data', root, *TINY, '--subset', '24', '--loader', loader]), numerics)
               for loader in ('memory', 'stream')]  # --subset: the same 24 images either way
    assert len(subsets[0]['train']) == len(subsets[1]['train']) == 24
    assert torch.equal(subsets[0]['train'].labels, subsets[1]['train'].labels)
    torch.testing.assert_close(subsets[0]['mean'], subsets[1]['mean'])
    with pytest.MonkeyPatch.context() as mp:  # auto: streamed where the decoded set would not fit
        mp.setattr(crl, 'fits_in_memory', lambda *a: False)
        assert crl.load_data(crl.parse_args(['--data', root, *TINY]), numerics, 48)['streamed']
    assert not crl.load_data(crl.parse_args(['--data', root, *TINY]), numerics, 48)['streamed']
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 3)
    crl.train(model, crl.Batches(streamed, 'train', 8, train=True), 2, 0.05)
    assert 0 <= crl.evaluate(model, streamed) <= 1


def test_a_64_pixel_run_counts_trains_and_exports_at_64_pixels(tmp_path):
    """An image folder of 64x64 images: the network is built, counted, timed and exported for 64x64 inputs."""
    root = write_image_folder(tmp_path / 'data', size=64)
    out = tmp_path / 'out'
    r = tiny_run(root, out, '--budget', 'params=0.3,macs=0.3', '--export')
    assert r['image_size'] == 64
    small, info = crl.load_pruned(str(out / 'pruned.pt'))
    dense, _ = crl.load_pruned(str(out / 'dense.pt'))
    assert info['input_shape'] == [3, 64, 64] and info['resize'] == 73
    (pp, pm), (dp, dm) = crl.count(small, (3, 64, 64)), crl.count(dense, (3, 64, 64))
    assert (r['pruned']['params'], r['pruned']['macs']) == (pp, pm) and (r['dense']['params'], r['dense']['macs']) \
        == (dp, dm)
    assert dm > 3.9 * crl.count(dense, (3, 32, 32))[1]  # MACs at 64 px (the convolutions 4 times theirs at 32)
    assert r['fractions']['macs'] == pytest.approx(pm / dm) and pm / dm <= 0.3
    if os.path.exists(out / 'pruned.onnx'):
        import onnx
        model = onnx.load(str(out / 'pruned.onnx'))
        assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 64, 64]
        meta = {p.key: json.loads(p.value) if p.value[:1] in '[{' else p.value for p in model.metadata_props}
    else:
        meta = json.load(open(out / 'pruned.json'))
    assert meta['input_shape'] == ['N', 3, 64, 64] and '73 px' in meta['input']


def test_download_failure_names_data(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    args = crl.parse_args(['--data-root', str(tmp_path)])
    with pytest.raises(crl.CRLError) as e:
        crl.load_data(args, crl.Numerics(torch.device('cpu')))
    assert '--data' in str(e.value) and '\n' not in str(e.value)


# --- Part II, 12. Networks: crl_tp.py, CRL on unmodified torchvision models through Torch-Pruning's groups ------------

@pytest.fixture(scope='module')
def crl_tp():
    pytest.importorskip('torch_pruning', reason='torch-pruning is not installed (pip install -r requirements-extras.txt)')
    import crl_tp
    return crl_tp


@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2', 'efficientnet_b0'])
def test_traced_torchvision_costs_compaction_and_masks_are_exact(crl_tp, name):
    """Residual additions (resnet18), depthwise convolutions (mobilenet_v2, efficientnet_b0), squeeze-excitation
    (efficientnet_b0): the costs equal the counts of the compacted network, the compacted network computes what the
    masked one does, a masked channel is exactly zero, and the classifier keeps its outputs."""
    torch.manual_seed(11)
    net = crl_tp.TracedNetwork(f'torchvision:{name}', 10, (3, 32, 32))
    randomise_bn(net.plain)
    costs = net.costs(['params', 'macs'])
    dense = crl.count(net.plain)
    policy = crl.Policy(net.widths, 0.5)
    x = torch.randn(2, 3, 32, 32)
    for keep in (0.3, 0.8):
        mask = random_mask(policy, keep)
        small = net.compact(policy.split(mask)).eval()
        kept = policy.kept(mask[None])
        assert [costs[c](kept).item() * d for c, d in zip(costs, dense)] == pytest.approx(crl.count(small), rel=1e-12)
        net.model.eval()
        with torch.no_grad():
            masked = net.model(x, [g[None] for g in policy.split(mask)])
            torch.testing.assert_close(small(x), masked, rtol=1e-4, atol=1e-4 * masked.abs().max().item())
        assert small(x).shape == (2, 10)
    assert not any(m._forward_hooks for m in net.plain.modules())  # the masks' hooks live only while they run
    if name == 'resnet18':  # no dropout: in training, slice k of K masks is the compact network on its images alone
        net.model.train()
        mask = random_mask(policy)
        small = net.compact(policy.split(mask)).train()
        for other in (torch.ones(sum(net.widths)), random_mask(policy)):
            out = net.model(torch.cat([x, x]), policy.split(torch.stack([mask, other])))[:2]
            torch.testing.assert_close(out, small(x), rtol=1e-3, atol=1e-3)


def test_traced_network_refuses_what_it_cannot_count_or_mask(crl_tp):
    """RegNet's grouped convolutions: counts that do not follow the widths; ConvNeXt's LayerNorm across channels: a
    masked channel still moves the statistics a removed one would not. Both refused when the costs are built."""
    for name, message in [('regnet_x_400mf', 'counts'), ('convnext_tiny', 'other outputs')]:
        with pytest.raises(crl.CRLError, match=message):
            crl_tp.TracedNetwork(f'torchvision:{name}', 10, (3, 32, 32)).costs(['params'])


def test_traced_prune_network_meets_the_budget_and_reloads(crl_tp, tmp_path):
    import torchvision
    torch.manual_seed(12)
    model = torchvision.models.mobilenet_v2(num_classes=2)
    data = signal_data(32)
    batches = crl.Batches(data, 'train', 8, train=True)
    small = crl_tp.prune_network(model, batches, {'params': 0.4, 'macs': 0.6}, prune_epochs=1, finetune_epochs=1,
                                 samples=2)
    (dp, dm), (sp, sm) = crl.count(model), crl.count(small)
    assert sp <= 0.4 * dp and sm <= 0.6 * dm and type(small) is type(model)
    crl_tp.save_pruned(small, tmp_path / 'small.pt', model)
    assert not any(m._forward_hooks for m in model.modules())  # the user's model is left without hooks
    code = ("import torch, torchvision, crl_prune; net, info = crl_prune.load_pruned('small.pt', "
            "model=torchvision.models.mobilenet_v2(num_classes=2)); print(sum(p.numel() for p in net.parameters()))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'PYTHONPATH': HERE})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == sp


def test_command_line_prunes_a_torchvision_model(crl_tp, tmp_path, tiny):
    out = tmp_path / 'out'
    plain = [a for a in TINY if a not in ('--arch', 'vgg11', '--width', '0.0625')]
    r = crl.main([*plain, '--arch', 'torchvision:mobilenet_v2', '--data', tiny, '--out', str(out),
                  '--budget', 'params=0.5,latency=0.99', '--latency-batch', '4'])
    assert r['pruned']['params'] <= 0.5 * r['dense']['params'] and r['budget_met'] and r['fractions']['latency'] <= 0.99
    assert set(r['latency']['fit']) >= {'coef', 'r2', 'degenerate'} and r['latency']['networks_timed'] >= 1
    assert len(r['channels']) == 25 and r['arch'] == 'torchvision:mobilenet_v2'
    net, info = crl.load_pruned(out / 'pruned.pt')  # rebuilt from torchvision, cut, loaded: nothing registered
    assert crl.count(net)[0] == r['pruned']['params'] and info['widths'] == list(r['channels'].values())
    for args, message in [(['--arch', 'torchvision:nosuchnet'], 'no classification model'),
                          (['--arch', 'torchvision:resnet18', '--width', '0.5'], 'built-in architectures')]:
        with pytest.raises(SystemExit, match=message):
            crl.main([*plain, *args, '--data', tiny, '--out', str(tmp_path / 'x')])


def test_pretrained_torchvision_weights_offline_say_where_the_file_goes(tmp_path, monkeypatch):
    """--pretrained torchvision downloads into torch's hub cache once; offline, one line names the file and where to
    put it, and a file put there loads without a network."""
    import argparse
    import torchvision
    import urllib.error
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))

    def offline(*a, **k):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    args = argparse.Namespace(arch='torchvision:resnet18', pretrained='torchvision')
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    path = tmp_path / 'hub' / 'checkpoints' / os.path.basename(url)
    with pytest.raises(crl.CRLError) as e:
        crl.torchvision_weights(args)
    assert url in str(e.value) and f'put it at {path}' in str(e.value) and '\n' not in str(e.value)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert crl.torchvision_weights(args)['fc.weight'].shape == (1000, 512)
    with pytest.raises(SystemExit, match='for --arch torchvision:NAME'):
        crl.main(['--pretrained', 'torchvision', '--arch', 'vgg11'])


def test_pretrained_torchvision_format_file_starts_the_dense_network(crl_tp, tmp_path, tiny):
    """A state dict in torchvision's format: every weight but the classifier's goes in, the classifier is new for the
    data's classes, the stem keeps its ImageNet strides, the inputs are normalised as ImageNet's, and the dense phase
    fine-tunes it (--dense-epochs). Weights of another network are a one-line error."""
    import torchvision
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()
    torch.save(imagenet.state_dict(), tmp_path / 'resnet18.pth')
    plain = [a for a in TINY if a not in ('--arch', 'vgg11', '--width', '0.0625')]
    argv = [*plain, '--arch', 'torchvision:resnet18', '--pretrained', str(tmp_path / 'resnet18.pth'),
            '--data', tiny, '--dense-epochs', '0', '--out', str(tmp_path / 'out')]
    pipeline = crl.Pipeline(crl.parse_args(argv))
    model = pipeline.net.plain
    assert pipeline.pretrained == 'torchvision' and model.conv1.kernel_size == (7, 7)
    assert torch.equal(model.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)
    assert model.fc.out_features == 3 and torch.equal(pipeline.stats['mean'], crl.IMAGENET_MEAN)
    r = crl.main(argv)
    dense, info = crl.load_pruned(str(tmp_path / 'out' / 'dense.pt'))
    assert torch.equal(dense.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)  # 0 epochs: as loaded
    assert info['mean'] == pytest.approx(crl.IMAGENET_MEAN.tolist()) and r['budget_met']
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / 'resnet34.pth')
    with pytest.raises(SystemExit, match='do not fit torchvision:resnet18: layer1.2'):
        crl.main([*argv[:-1], str(tmp_path / 'x'), '--pretrained', str(tmp_path / 'resnet34.pth')])


def test_readme_torchvision_example_runs(crl_tp, tmp_path):
    (tmp_path / 'prune_tv.py').write_text(readme_block('# prune_tv.py'))
    r = subprocess.run([sys.executable, 'prune_tv.py'], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'PYTHONPATH': HERE})
    assert r.returncode == 0, r.stderr
    (dp, dm), (sp, sm) = [tuple(int(v) for v in part.strip('() ').split(',')) for part in r.stdout.strip().split(') (')]
    assert sp <= 0.3 * dp and sm <= 0.5 * dm
    assert (tmp_path / 'mobilenet_pruned.pt').exists()


# --- Part II, 13. Measured costs: latency, the final mask found by measuring, the fit checked -------------------------

class TimedByMACs(crl.MeasuredCost):
    """A measured cost whose 'measurement' is the MAC count of the network measured (deterministic) and whose
    prediction is off by `error` (2: predicts twice the truth, so the predicted choice is too short)."""

    def __init__(self, model, error):
        self.macs, self.error, self.timed = crl.make_costs(model, ['macs'])['macs'], error, 0

    def __call__(self, widths):
        return self.macs(widths) * self.error

    def measurements(self, *models, rounds=3):
        self.timed += len(models)
        return [crl.count(m)[1] / 1e6 for m in models], [0.0] * len(models)


@pytest.mark.parametrize('error', [3.0, 0.4])
def test_latency_mask_is_searched_by_timing_in_both_directions(error):
    torch.manual_seed(10)
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.25), 10)
    policy = crl.Policy(crl.group_widths(model), 0.5)
    policy.theta.data.normal_(0, 2)
    latency = TimedByMACs(model, error)
    costs = {'params': crl.make_costs(model, ['params'])['params'], 'latency': latency}
    budget = torch.tensor([0.6, 0.3], dtype=torch.float64)
    predicted = crl.final_mask(policy, costs, budget)  # what the prediction alone would keep
    mask = crl.measured_final_mask(crl.Prunable(model), policy, costs, budget, 1)
    measured = latency.final
    ratio = measured['pruned'] / measured['dense']
    assert measured['fraction'] == ratio
    assert ratio <= 0.3 and ratio == pytest.approx(crl.count(crl.compact(model, policy.split(mask)))[1] /
                                                   crl.count(model)[1])
    assert ratio >= 0.9 * 0.3  # the budget is used, whichever way the prediction erred
    assert crl.allowed({'params': costs['params']}, budget[:1], policy.kept(mask[None]))[0]
    assert (mask.sum() > predicted.sum()) == (error > 1)  # grown when the prediction was pessimistic, else cut
    assert latency.timed <= 2 * 40  # a search, not a sweep: pairs of networks timed


def test_a_degenerate_latency_fit_is_reported_and_replaced(monkeypatch):
    """Whole-network timings that fall as networks grow (a busy machine) give a negative slope: the table says so and
    predicts with the units' sum alone, which still rises with every width."""
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 10)
    monkeypatch.setattr(crl, 'time_forward', lambda net, x, *a, **k: (sum(p.numel() for p in net.parameters()) *
                                                                       1e-9, 0.0))  # units: time grows with size
    monkeypatch.setattr(crl, 'time_in_turns', lambda nets, *a, **k: ([1e6 / crl.count(n)[0] for n in nets],
                                                                      [0.0] * len(nets)))
    table = crl.build_latency_table(model, crl.Numerics(torch.device('cpu')), 2, repeats=1)
    fit = table['fit']
    assert fit['degenerate'] and fit['coef'][0] < 0 and 'degenerate' in fit['note']
    assert table['coef'] == [1.0, 0.0]
    cost = crl.Latency(table)
    small, dense = torch.tensor([[1] * 9]), torch.tensor([crl.group_widths(model)])
    assert 0 < cost(small).item() < cost(dense).item() == pytest.approx(1.0)


def test_scattered_timings_are_taken_again(monkeypatch):
    calls = []

    def fake(net, x, numerics, repeats=20, warmup=3):
        calls.append(net)
        return (1.0, 0.5) if len(calls) <= 4 else (0.9, 0.1)  # the first rounds scatter, the retaken ones do not
    monkeypatch.setattr(crl, 'time_forward', fake)
    ms, spread = crl.time_in_turns(['a', 'b'], None, crl.Numerics(torch.device('cpu')), rounds=2)
    assert calls == ['a', 'b'] * 4 and ms == [900.0, 900.0] and spread == [0.1, 0.1]
    calls.clear()
    monkeypatch.setattr(crl, 'time_forward', lambda *a, **k: calls.append(1) or (1.0, 0.05))
    assert crl.time_in_turns(['a'], None, crl.Numerics(torch.device('cpu')), rounds=3) == ([1000.0], [0.05])
    assert len(calls) == 3  # steady timings: no second pass


def test_latency_prediction_is_the_units_table_at_the_grid_widths():
    """At widths on every unit's grid, the prediction is a * (the sum of the units' timed entries) + b."""
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 10)
    widths = crl.group_widths(model)
    table = {'meta': {'widths': widths}, 'coef': [1.5, 0.25], 'units': []}
    g = torch.Generator().manual_seed(0)
    for u in crl.units(model):
        gin = [3] if u.inp is None else [1, widths[u.inp] // 2, widths[u.inp]]
        gout = [10] if u.out is None else [1, widths[u.out] // 2, widths[u.out]]
        table['units'].append({'inp': u.inp, 'out': u.out, 'grid_in': gin, 'grid_out': gout,
                               'ms': torch.rand(len(gin), len(gout), generator=g, dtype=torch.float64)})
    cost = crl.Latency(table)
    for pick in (0, 1, 2):  # every group at grid point `pick`
        w = [[1, max(1, x // 2), x][pick] for x in widths]
        expected = sum(t['ms'][0 if t['inp'] is None else pick, 0 if t['out'] is None else pick]
                       for t in table['units']) * 1.5 + 0.25
        assert cost.predict_ms(torch.tensor([w])).item() == pytest.approx(expected.item())


def test_latency_search_times_its_choice_again_before_keeping_it():
    """A network measured within budget at 3 rounds but over it at 5 (a slow moment, or a fast one that let it
    through) is not kept: the search steps down until the 5-round timing holds too."""
    torch.manual_seed(13)
    model = crl.build('vgg11', crl.dense_widths('vgg11', 0.25), 10)
    policy = crl.Policy(crl.group_widths(model), 0.5)
    policy.theta.data.normal_(0, 2)

    class SlowerAtFive(TimedByMACs):
        def measurements(self, *models, rounds=3):
            ms, spread = super().measurements(*models, rounds=rounds)
            return ([ms[0] * (1.1 if rounds == 5 else 1.0), *ms[1:]], spread)
    latency = SlowerAtFive(model, 1.0)
    costs = {'latency': latency}
    _, mask = crl.final_network(crl.Prunable(model), policy, costs, torch.tensor([0.3], dtype=torch.float64))
    assert latency.final['pruned'] / latency.final['dense'] <= 0.3  # the 5-round timing, the last one taken
    macs = crl.count(crl.compact(model, policy.split(mask)))[1] / crl.count(model)[1]
    assert 1.1 * macs <= 0.3 and macs > 0.8 * 0.3 / 1.1


def test_time_forward_is_the_median_of_the_repeats(monkeypatch):
    clock = iter([0, 5, 5, 6, 6, 9, 9, 10, 10, 12, 12, 13, 13, 20])  # warm-up 5; then 1, 3, 1, 2, 1, 7 seconds
    monkeypatch.setattr(crl.time, 'perf_counter', lambda: next(clock))
    median, spread = crl.time_forward(lambda x: x, None, crl.Numerics(torch.device('cpu')), repeats=6, warmup=1)
    assert median == 2 and spread == pytest.approx((3 - 1) / 2)  # sorted: 1 1 1 2 3 7


# --- Part II, 13-14. Costs that can only be evaluated: latency tables, user cost files, absolute budgets --------------

COST_FILE = """
import torch
def energy(widths, names):      # any function of the kept widths: here squares, so not the parameter count
    assert names[0] == 'conv1'
    return (widths.double() ** 2).sum(1) + 1.0
def bumpy(widths, names):       # falls when channels are added to conv2: not monotone
    return widths[:, 0].double() * 10 - widths[:, 1].double() * 2 + 20
def wrong_shape(widths, names):
    return [1.0, 2.0, 3.0]
def nan(widths, names):
    return torch.full((len(widths),), float('nan'))
def zero(widths, names):
    return torch.zeros(len(widths))
"""


def test_user_cost_is_respected_by_the_compact_network(tmp_path, tiny):
    path = tmp_path / 'costs.py'
    path.write_text(COST_FILE)
    r = tiny_run(tiny, tmp_path / 'out', '--cost', f'energy={path}:energy',
                  '--budget', 'energy=0.2,params=0.9')
    widths = torch.tensor([list(r['channels'].values())])
    dense = torch.tensor([list(r['dense_channels'].values())])
    value = lambda w: ((w.double() ** 2).sum(1) + 1).item()  # noqa: E731
    assert r['fractions']['energy'] == pytest.approx(value(widths) / value(dense))
    assert value(widths) <= 0.2 * value(dense) and r['budget_met']
    assert r['budget_absolute']['energy'] == pytest.approx(0.2 * value(dense))


def test_non_monotone_cost_still_ends_within_budget(tmp_path, tiny):
    path = tmp_path / 'costs.py'
    path.write_text(COST_FILE)
    r = tiny_run(tiny, tmp_path / 'out', '--cost', f'bumpy={path}:bumpy',
                  '--budget', 'bumpy=0.8')
    w = list(r['channels'].values())
    dense = list(r['dense_channels'].values())
    assert (w[0] * 10 - w[1] * 2 + 20) <= 0.8 * (dense[0] * 10 - dense[1] * 2 + 20) and r['budget_met']


@pytest.mark.parametrize('spec, message', [
    ('energy={missing}:energy', 'no such file'),
    ('energy={broken}:energy', 'cannot import'),
    ('energy={good}:nope', "no function 'nope'"),
    ('energy={good}:wrong_shape', 'one per candidate'),
    ('energy={good}:nan', 'non-finite'),
    ('energy={good}:zero', 'must be positive'),
    ('energy', 'NAME=path/to/file.py:function'),
    ('params={good}:energy', 'built-in cost'),
])
def test_bad_cost_files_fail_with_one_line(tmp_path, tiny, spec, message):
    (tmp_path / 'good.py').write_text(COST_FILE)
    (tmp_path / 'broken.py').write_text('def energy(:\n')
    spec = spec.format(missing=tmp_path / 'missing.py', broken=tmp_path / 'broken.py', good=tmp_path / 'good.py')
    with pytest.raises(SystemExit) as e:
        tiny_run(tiny, tmp_path / 'out', '--cost', spec,
                  '--budget', f"{spec.partition('=')[0]}=0.5")
    assert message in str(e.value.code) and '\n' not in str(e.value.code)
    assert not (tmp_path / 'out').exists()


def test_absolute_and_fractional_budgets_agree():
    model = crl.build('vgg16', crl.dense_widths('vgg16'), 10)
    params, macs = crl.count(model)
    dense = {'params': params, 'macs': macs, 'latency': 4.0}
    absolute = crl.resolve_budget(crl.parse_budget('params=1.4987210M,macs=31.3463808M,latency=1ms'), dense)
    fraction = crl.resolve_budget(crl.parse_budget('params=0.1,macs=0.1,latency=0.25'), dense)
    assert absolute == pytest.approx(fraction)
    assert crl.parse_budget('latency=2500us') == {'latency': (2500.0, 'us')}
    for bad, message in [('params=2ms', 'K, M or G'), ('latency=3M', 'us, ms or s'), ('params=0.1,params=0.2', 'twice'),
                         ('params=1500000', 'with a unit'), ('params=inf', 'fraction')]:
        with pytest.raises(crl.CRLError, match=message):
            crl.parse_budget(bad)
    with pytest.raises(crl.CRLError, match='more than the dense'):
        crl.resolve_budget(crl.parse_budget('params=20M'), dense)


def test_latency_table_structure_reuse_and_refusal(tmp_path):
    net = crl.network('resnet18', 0.0625, 10)
    model = net.model
    args = crl.parse_args(['--arch', 'resnet18', '--width', '0.0625', '--budget', 'latency=0.9',
                           '--out', str(tmp_path / 'a')])
    cost = crl.latency_cost(net, args)
    table = torch.load(tmp_path / 'a' / 'latency_table.pt', weights_only=True)
    assert len(table['units']) == len(crl.units(model))  # one entry per unit, in order, with its groups
    assert [(t['inp'], t['out']) for t in table['units']] == [(u.inp, u.out) for u in crl.units(model)]
    assert all((t['ms'] > 0).all() for t in table['units']) and table['dense_ms'] > 0
    for t, u in zip(table['units'], crl.units(model)):  # the grid spans 1 to the dense width of each group
        assert t['grid_out'][-1] == (model.num_classes if u.out is None else crl.group_widths(model)[u.out])
    widths = torch.tensor([crl.group_widths(model), [1] * 12, [3] * 12])
    assert (cost.predict_ms(widths) > 0).all() and cost(widths).shape == (3,)
    args.latency_table = str(tmp_path / 'a' / 'latency_table.pt')  # reused as it is, nothing timed again
    again = crl.latency_cost(net, args)
    assert torch.equal(again.predict_ms(widths), cost.predict_ms(widths)) and again.build_s == 0
    args.latency_batch = 4
    with pytest.raises(crl.CRLError, match='made for another batch'):
        crl.latency_cost(net, args)


def test_latency_budget_end_to_end_reports_measured_latency(tmp_path, tiny):
    out = tmp_path / 'out'
    r = crl.main([*TINY, '--width', '0.25', '--data', tiny, '--out', str(out), '--budget', 'latency=0.9',
                  '--latency-batch', '8'])  # at batch 1 this small a network is all overhead: nothing to cut
    saved = json.loads((out / 'results.json').read_text())
    lat = saved['latency']
    assert lat['device'].startswith('cpu') and lat['batch'] == 8
    for k in ('dense_measured_ms', 'dense_predicted_ms', 'pruned_measured_ms', 'pruned_predicted_ms'):
        assert lat[k] > 0
    assert saved['fractions']['latency'] == pytest.approx(lat['pruned_measured_ms'] / lat['dense_measured_ms'])
    assert saved['budget_met'] == (saved['fractions']['latency'] <= 0.9) == r['budget_met']
    assert lat['budget_used'] == pytest.approx(saved['fractions']['latency'] / 0.9) and lat['networks_timed'] >= 1
    assert set(lat['fit']) >= {'coef', 'r2', 'degenerate'} and lat['noisy'] == (lat['scatter'] > 0.25)
    assert (out / 'latency_table.pt').exists()


# --- Part II, 15. Checkpoints and --resume ----------------------------------------------------------------------------
# TINY: 36 training images, batch 12, so 3 steps per epoch in every phase; with 2 epochs a phase, steps 1-6 are dense
# training, 7-12 pruning, 13-18 fine-tuning.
RESUMABLE = [*TINY, '--dense-epochs', '2', '--prune-epochs', '2', '--finetune-epochs', '2', '--budget', 'params=0.3',
             '--checkpoint-every', '0']


def interrupt_at(mp, step):
    """Ctrl-C (a KeyboardInterrupt) after `step` training steps, counted over all phases."""
    real, calls = crl.Progress.add, []

    def add(self, *a, **k):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    mp.setattr(crl.Progress, 'add', add)


@pytest.mark.parametrize('step, saved', [(5, 'dense epoch 1'), (11, 'prune epoch 1'), (17, 'finetune epoch 1')])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, tiny, step, saved):
    whole = crl.main([*RESUMABLE, '--data', tiny, '--out', str(tmp_path / 'whole')])
    out = str(tmp_path / 'cut')
    argv = [*RESUMABLE, '--data', tiny, '--out', out]
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at(mp, step)
        with pytest.raises(SystemExit) as e:
            crl.main(argv)
    line = str(e.value.code)
    assert 'interrupted' in line and saved in line and line.endswith(shlex.join(['python', os.path.relpath(crl.__file__),
                                                                                 *argv, '--resume']))
    with pytest.raises(SystemExit, match='--resume'):  # an unfinished run is not started over by accident
        crl.main(argv)
    resumed = crl.main([*argv, '--resume'])
    for key in ('channels', 'dense', 'pruned', 'multipliers', 'keep_probability_mean', 'budget_met'):
        assert resumed[key] == whole[key], key
    a, b = (torch.load(os.path.join(d, 'pruned.pt'), weights_only=True)['state_dict'] for d in (tmp_path / 'whole', out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(os.path.join(out, 'checkpoint.pt'))  # a finished run leaves its results only
    timeless = lambda d: [{k: v for k, v in r.items() if k not in ('images_per_s', 'eta_s')}  # noqa: E731
                          for r in csv.DictReader(open(os.path.join(d, 'metrics.csv')))]
    assert timeless(out) == timeless(tmp_path / 'whole')  # the log too: every row once, as in one run
    with pytest.raises(SystemExit, match='finished already'):
        crl.main([*argv, '--resume'])


def test_interrupted_before_any_checkpoint_says_how_to_start_again(tmp_path, tiny):
    argv = [*RESUMABLE, '--data', tiny, '--out', str(tmp_path / 'out')]
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at(mp, 1)
        with pytest.raises(SystemExit) as e:
            crl.main(argv)
    assert str(e.value.code).endswith(shlex.join(['python', os.path.relpath(crl.__file__), *argv, '--overwrite']))
    assert crl.main([*argv, '--overwrite'])['budget_met']  # and that command runs


def test_an_interrupted_overwrite_resumes(tmp_path, tiny):
    argv = [*RESUMABLE, '--data', tiny, '--out', str(tmp_path / 'out')]
    crl.main(argv)
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at(mp, 8)
        with pytest.raises(SystemExit, match='resume with'):
            crl.main([*argv, '--overwrite'])
    assert crl.main([*argv, '--overwrite', '--resume'])['budget_met']


def test_resume_refuses_what_it_cannot_continue(tmp_path, tiny):
    out = str(tmp_path / 'out')
    with pytest.raises(SystemExit, match='cannot read'):
        crl.main([*RESUMABLE, '--data', tiny, '--out', out, '--resume'])
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at(mp, 8)
        with pytest.raises(SystemExit, match='interrupted'):
            crl.main([*RESUMABLE, '--data', tiny, '--out', out])
    with pytest.raises(SystemExit, match=r"other arguments: --lr 0\.1 \(now 0\.05\)"):
        crl.main([*RESUMABLE, '--data', tiny, '--out', out, '--resume', '--lr', '0.05'])


def test_checkpoints_are_written_every_so_many_seconds_and_at_phase_ends(tmp_path, tiny, monkeypatch):
    phases = []
    real = crl.save_atomic
    monkeypatch.setattr(crl, 'save_atomic', lambda obj, path: (path.endswith('checkpoint.pt') and phases.append(
        (obj['phase'], obj['epoch']))) or real(obj, path))
    crl.main([*RESUMABLE, '--data', tiny, '--out', str(tmp_path / 'a'), '--checkpoint-every', '3600'])
    assert phases == [('dense', 2), ('prune', 2), ('finetune', 2)]
    phases.clear()
    crl.main([*RESUMABLE, '--data', tiny, '--out', str(tmp_path / 'b')])
    assert phases == [(p, e) for p in ('dense', 'prune', 'finetune') for e in (1, 2)]


def test_a_save_killed_halfway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pt')
    crl.save_atomic({'epoch': 1}, path)

    def dies_halfway(obj, f):
        with open(f, 'wb') as h:
            h.write(b'half a file')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        crl.save_atomic({'epoch': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'epoch': 1}


# --- Part II, 15-16. What a run leaves: metrics.csv, TensorBoard, policy.pt, saving, export ---------------------------

@pytest.fixture(scope='module')
def logged_run(tmp_path_factory):
    """One tiny run with two constraints and --export: its folder, results and printed lines."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp('logged')
    data, out, printed = write_image_folder(root / 'data'), root / 'out', io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = tiny_run(data, out, '--budget', 'params=0.3,macs=0.5', '--export')
    return out, results, printed.getvalue().splitlines()


def test_metrics_csv_has_a_row_per_printed_line_and_the_test_accuracies(logged_run):
    import csv
    out, results, printed = logged_run
    with open(out / 'metrics.csv', newline='') as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames
    assert columns == ['phase', 'epoch', 'step', 'images', 'loss', 'accuracy', 'images_per_s', 'eta_s',
                       'cost_params', 'cost_macs', 'lambda_params', 'lambda_macs', 'keep_mean', 'keep_below_0.1',
                       'keep_above_0.9', 'test_accuracy']
    progress = [line for line in printed if line.split(' epoch ')[0] in ('dense', 'prune', 'finetune')]
    logged = [r for r in rows if not r['test_accuracy']]
    assert len(progress) == len(logged) == 9  # 3 steps per phase, --log-every 1
    for line, row in zip(progress, logged):
        words = line.split()
        assert words[0] == row['phase'] and float(words[words.index('loss') + 1]) == pytest.approx(float(row['loss']),
                                                                                                   abs=5e-4)
        assert 'eta' in words
        pruning = row['phase'] == 'prune'
        for name in ('cost_params', 'lambda_macs', 'keep_mean', 'keep_below_0.1', 'keep_above_0.9'):
            assert (row[name] != '') == pruning, (name, row)
        if pruning:
            assert float(row['cost_params']) == pytest.approx(float(words[words.index('cost') + 1][7:]), abs=5e-4)
            assert 0 <= float(row['keep_below_0.1']) <= 1 - float(row['keep_above_0.9']) <= 1
    assert [int(r['images']) for r in logged if r['phase'] == 'dense'] == [12, 24, 36]  # counted from the phase start
    assert [int(r['step']) for r in logged if r['phase'] == 'finetune'] == [1, 2, 3]
    assert [r['phase'] for r in rows if r['test_accuracy']] == ['dense', 'prune', 'finetune']
    tests = {r['phase']: float(r['test_accuracy']) for r in rows if r['test_accuracy']}
    assert tests == {'dense': results['dense']['accuracy'], 'prune': results['pruned']['accuracy_before_finetune'],
                     'finetune': results['pruned']['accuracy']}
    assert float(logged[-1]['eta_s']) == 0 and progress[-1].split()[-1] == '0s'  # nothing left at the phase's end


def test_eta_is_the_time_left_at_the_steady_state_rate(monkeypatch, capsys):
    clock = iter([0, 30, 32, 36])  # start, end of the 2 warm-up steps (15 s each), lines at steps 4 and 8 (1 s each)
    monkeypatch.setattr(crl.time, 'time', lambda: next(clock))
    progress = crl.Progress('dense', 4, torch.device('cpu'), warmup=2, total_steps=100)
    x = torch.zeros(8, 2)
    for step in range(1, 9):
        progress.add(torch.tensor(1.0), x, torch.zeros(8, dtype=torch.long))
        progress.maybe_print(1, step, 100)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith('eta 1m36s') and lines[1].endswith('eta 1m32s')  # 92 steps left at 1 s, not 15 s
    assert crl.duration(45) == '45s' and crl.duration(83) == '1m23s' and crl.duration(7500) == '2h05m'


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import fails as if tensorboard were absent
    with pytest.raises(SystemExit) as e:
        tiny_run(tiny, tmp_path / 'out', '--tensorboard')
    assert 'needs the tensorboard package' in str(e.value.code) and '\n' not in str(e.value.code)
    assert not (tmp_path / 'out').exists()


def test_tensorboard_events_hold_the_metrics(tmp_path, tiny):
    pytest.importorskip('tensorboard', reason='the tensorboard package is not installed')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'out'
    r = tiny_run(tiny, out, '--tensorboard')
    events = EventAccumulator(str(out / 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'prune/cost_params', 'prune/lambda_params', 'prune/keep_mean', 'dense/loss'} <= tags
    assert [e.value for e in events.Scalars('finetune/test_accuracy')] == [pytest.approx(r['pruned']['accuracy'])]
    assert [e.step for e in events.Scalars('prune/loss')] == [1, 2, 3]


def test_run_saves_the_final_keep_probabilities(logged_run):
    out, results, _ = logged_run
    theta = torch.load(out / 'policy.pt', weights_only=True)['theta']
    assert list(theta) == list(results['dense_channels'])
    assert [len(t) for t in theta.values()] == list(results['dense_channels'].values())
    assert torch.sigmoid(torch.cat(list(theta.values()))).mean().item() == pytest.approx(
        results['keep_probability_mean'])


@pytest.mark.parametrize('arch', ['vgg11', 'resnet18'])
def test_exported_program_gives_load_pruneds_outputs(tmp_path, arch):
    policy = crl.Policy(crl.dense_widths(arch, 0.125), 0.5)
    model = randomise_bn(crl.build(arch, crl.dense_widths(arch, 0.125), 10))
    small = crl.compact(model, policy.split(random_mask(policy)))
    crl.save_pruned(small, tmp_path / 'pruned.pt', torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    crl.export_pruned(str(tmp_path / 'pruned.pt'), str(tmp_path / 'pruned.pt2'))
    exported = torch.export.load(str(tmp_path / 'pruned.pt2')).module()
    reference, _ = crl.load_pruned(tmp_path / 'pruned.pt')
    with torch.no_grad():
        for batch in (1, 5):  # any batch size, not only the example's
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(exported(x), reference(x), rtol=1e-4, atol=1e-4)
    meta = json.loads((tmp_path / 'pruned.json').read_text())
    assert meta['mean'] == pytest.approx([0.4, 0.5, 0.6]) and meta['std'] == pytest.approx([0.2, 0.25, 0.3])
    assert meta['input_layout'] == 'NCHW' and meta['num_classes'] == 10 and meta['widths'] == crl.group_widths(small)


def test_onnx_export_gives_load_pruneds_outputs(tmp_path):
    for module in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(module, reason=f'{module} is not installed: the ONNX export is not tested here')
    import onnx
    import onnxruntime
    policy = crl.Policy(crl.dense_widths('vgg11', 0.125), 0.5)
    model = randomise_bn(crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 10))
    crl.save_pruned(crl.compact(model, policy.split(random_mask(policy))), tmp_path / 'pruned.pt',
                   torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    crl.export_pruned(str(tmp_path / 'pruned.pt'), str(tmp_path / 'pruned.onnx'))
    session = onnxruntime.InferenceSession(str(tmp_path / 'pruned.onnx'))
    reference, _ = crl.load_pruned(tmp_path / 'pruned.pt')
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.randn(batch, 3, 32, 32)
            (out,) = session.run(None, {'input': x.numpy()})
            torch.testing.assert_close(torch.from_numpy(out), reference(x), rtol=1e-4, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / 'pruned.onnx')).metadata_props}
    assert json.loads(meta['std']) == pytest.approx([0.2, 0.25, 0.3]) and meta['input_layout'] == 'NCHW'


def test_run_with_export_writes_the_deployable_network(logged_run):
    out, results, printed = logged_run
    name = 'pruned.onnx' if crl.onnx_available() else 'pruned.pt2'
    assert (out / name).stat().st_size > 0 and f"exported the pruned network to {out / name}" in printed
    if name == 'pruned.pt2':
        exported = torch.export.load(str(out / name)).module()
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), crl.load_pruned(out / 'pruned.pt')[0](x), rtol=1e-4, atol=1e-4)


def test_failed_export_is_one_line_and_keeps_the_results(tmp_path, tiny, monkeypatch):
    def broken(path, out_path):
        raise RuntimeError('unsupported operator\nmore detail')
    monkeypatch.setattr(crl, 'export_pruned', broken)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        tiny_run(tiny, out, '--export')
    assert 'unsupported operator' in str(e.value.code) and '\n' not in str(e.value.code)
    assert json.loads((out / 'results.json').read_text())['budget_met'] and (out / 'pruned.pt').exists()


@pytest.mark.parametrize('saved', ['metrics.csv', 'policy.pt', 'pruned.pt2', 'pruned.onnx', 'tensorboard'])
def test_logs_and_exports_of_an_earlier_run_are_not_overwritten(tmp_path, tiny, saved):
    out = tmp_path / 'out'
    out.mkdir()
    (out / saved).write_text('precious')
    with pytest.raises(SystemExit, match='--overwrite'):
        tiny_run(tiny, out, '--export')
    assert (out / saved).read_text() == 'precious'


def test_overwrite_removes_the_exports_of_the_run_it_replaces(tmp_path, tiny):
    out = tmp_path / 'out'
    out.mkdir()
    for name in crl.EXPORTS:
        (out / name).write_text('the export of an earlier network')
    tiny_run(tiny, out, '--overwrite')
    assert (out / 'pruned.pt').exists() and not any((out / name).exists() for name in crl.EXPORTS)


PNG = b'\x89PNG\r\n\x1a\n'


def test_fold_bn_folds_a_torchvision_network_too():
    import torchvision
    torch.manual_seed(15)
    model = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    folded = crl.fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-3, atol=1e-3)


# --- Part II, 16-17. What a user saved: --pretrained, load_pruned, the resume command ---------------------------------

def test_pretrained_gives_the_architecture_and_width(tmp_path, tiny):
    first = tmp_path / 'first'
    tiny_run(tiny, first)
    plain = [a for a in TINY if a not in ('--arch', 'vgg11', '--width', '0.0625')]
    r = crl.main([*plain, '--data', tiny, '--out', str(tmp_path / 'again'), '--pretrained', str(first / 'dense.pt')])
    assert (r['arch'], r['width']) == ('vgg11', 0.0625)
    with pytest.raises(SystemExit, match='holds a vgg11 of width 0.0625, not a vgg11 of width 0.25'):
        crl.main([*plain, '--width', '0.25', '--data', tiny, '--out', str(tmp_path / 'x'), '--pretrained',
                  str(first / 'dense.pt')])
    assert not (tmp_path / 'x').exists()


def test_load_pruned_gives_what_a_deployer_needs(logged_run):
    out, results, printed = logged_run
    net, info = crl.load_pruned(out / 'pruned.pt')
    assert not net.training and info['classes'] == ['class0', 'class1', 'class2']
    assert len(info['mean']) == len(info['std']) == 3 and info['input_shape'] == [3, 32, 32]
    assert info['widths'] == list(results['channels'].values())
    with pytest.raises(crl.CRLError, match='pass model='):
        torch.save({**torch.load(out / 'pruned.pt', weights_only=True), 'arch': None}, out / 'own.pt')
        crl.load_pruned(out / 'own.pt')


def test_a_policy_far_from_its_budget_is_reported(logged_run):
    out, results, printed = logged_run
    expected = results['expected_cost_after_pruning']
    assert set(expected) == {'params', 'macs'} and expected['params'] > 1.25 * 0.3  # one short epoch: far from it
    assert any(line.startswith("note: pruning ended with the policy's expected params at") for line in printed)


def test_the_resume_command_names_the_script_that_was_run(tmp_path, tiny, monkeypatch):
    argv = [*RESUMABLE, '--data', tiny, '--out', str(tmp_path / 'out')]
    monkeypatch.setattr(sys, 'argv', ['some/where/crl_prune.py', *argv])
    interrupt_at(monkeypatch, 8)
    with pytest.raises(SystemExit) as e:
        crl.main()
    assert str(e.value.code).endswith(shlex.join(['python', 'some/where/crl_prune.py', *argv, '--resume']))


def test_load_pruned_rebuilds_networks_wider_than_width_one(tmp_path):
    wide = crl.build('vgg11', [80, 96, 160, 160, 320, 320, 320, 320, 256], 10)  # e.g. --width 1.25, then pruned
    crl.save_pruned(wide, tmp_path / 'wide.pt')
    net, info = crl.load_pruned(tmp_path / 'wide.pt')
    assert crl.group_widths(net) == info['widths'] == crl.group_widths(wide)
    with pytest.raises(crl.CRLError, match='do not fit'):
        crl.Prunable(crl.build('vgg11', crl.dense_widths('vgg11', 0.125), 10)).shrink([100] * 9)


# --- Part II, 17. The command line: bad input -------------------------------------------------------------------------



@pytest.mark.parametrize('args, message', [
    (['--arch', 'vgg17'], 'unknown --arch'),
    (['--budget', 'params=abc'], 'not a number'),
    (['--budget', 'params=0'], 'in (0, 1]'),
    (['--budget', 'params=1.5'], 'in (0, 1]'),
    (['--budget', 'foo=0.1'], 'unknown cost'),
    (['--budget', 'params=1e-6'], 'infeasible'),
    (['--width', '0'], '--width'),
    (['--samples', '1'], '--samples'),
    (['--no-such-flag'], 'unrecognized'),
    (['--device', 'gpu7'], '--device'),
    (['--device', 'mps'], 'not available'),
    (['--device', 'meta'], 'not available'),
    (['--wd', '-1'], '--wd must be a finite number >= 0'),
    (['--dual-lr', 'nan'], '--dual-lr must be a finite number >= 0'),
    (['--damping', 'inf'], '--damping must be a finite number >= 0'),
    (['--lead', '-1'], '--lead must be a finite number >= 0'),
    (['--lr', 'inf'], '--lr must be a positive finite number'),
    (['--budget', 'params=0.1,params=0.9'], 'given twice'),
    (['--prune-epochs', '0'], '--prune-epochs must be >= 1'),
    (['--batch-size', '1'], 'at least 2 images per sampled mask'),
    (['--subset', '1000'], 'has only 36 images'),
    (['--subset', '1'], 'fewer than one batch'),
])
def test_bad_arguments_fail_with_one_line(tmp_path, tiny, args, message):
    with pytest.raises(SystemExit) as e:
        crl.main(['--data', tiny, '--out', str(tmp_path / 'out'), *args])
    assert message in str(e.value.code) and '\n' not in str(e.value.code)
    assert not (tmp_path / 'out').exists()


def test_bad_data_and_checkpoints(tmp_path, tiny):
    out = str(tmp_path / 'out')
    cases = [(['--data', str(tmp_path / 'missing')], 'train/ and test/'),
             (['--data', str(tmp_path)], 'train/ and test/')]
    empty = tmp_path / 'empty'
    (empty / 'train' / 'a').mkdir(parents=True)
    (empty / 'test' / 'a').mkdir(parents=True)
    cases.append((['--data', str(empty)], 'holds no images'))
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    cases.append((['--data', tiny, '--pretrained', str(garbage)], 'cannot load'))
    cases.append((['--data', tiny, '--pretrained', str(tmp_path / 'nope.pt')], 'no such file'))
    wrong = tmp_path / 'wrong.pt'
    torch.save({'state_dict': crl.build('vgg13', crl.dense_widths('vgg13', 0.0625), 3).state_dict()}, wrong)
    cases.append((['--data', tiny, '--pretrained', str(wrong)], 'cannot load'))
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            crl.main([*TINY, '--out', out, *args])
        assert message in str(e.value.code), args
        assert not os.path.exists(out)


def test_out_that_is_a_file_is_refused(tmp_path, tiny):
    out = tmp_path / 'results'
    out.write_text('precious')
    with pytest.raises(SystemExit, match='is a file'):
        tiny_run(tiny, out)
    assert out.read_text() == 'precious'


def test_corrupt_image_is_named(tmp_path, tiny):
    bad = os.path.join(tiny, 'train', 'class0', 'broken.png')
    with open(bad, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n not really')
    crl.read_image_folder.cache_clear()
    with pytest.raises(SystemExit) as e:
        tiny_run(tiny, tmp_path / 'out')
    assert 'cannot read image' in str(e.value.code) and 'broken.png' in str(e.value.code)


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    from PIL import Image
    import numpy as np
    path = tmp_path / 'grey16.png'
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith('I')
    assert abs(int(crl.decode(str(path), 32, 32)[0, 0, 0]) - 128) <= 1  # half of the range, not 255


def test_constant_channel_gives_finite_inputs(tmp_path):
    from PIL import Image
    import numpy as np
    for split, n in (('train', 8), ('test', 4)):
        for c in ('a', 'b'):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                a = np.random.randint(0, 255, (32, 32, 3), dtype=np.uint8)
                a[..., 2] = 7  # blue never varies
                Image.fromarray(a).save(tmp_path / split / c / f'{i}.png')
    args = crl.parse_args(['--data', str(tmp_path), '--batch-size', '16'])
    data = crl.load_data(args, crl.Numerics(torch.device('cpu')))
    assert data['std'][2] > 0
    assert all(torch.isfinite(x).all() for x, _ in crl.Batches(data, 'train', 8, train=True))


@pytest.mark.parametrize('flag, phase', [(['--lr', '1e30'], 'dense epoch 1'),
                                         (['--prune-lr', '1e30'], 'prune epoch 1')])
def test_divergence_stops_with_one_line_and_saves_no_nan_checkpoint(tmp_path, tiny, flag, phase):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        tiny_run(tiny, out, *flag)
    assert phase in str(e.value.code) and 'diverged' in str(e.value.code) and '\n' not in str(e.value.code)
    assert not (out / 'pruned.pt').exists()
    if (out / 'dense.pt').exists():  # saved only after a finite dense phase
        state = torch.load(out / 'dense.pt', weights_only=True)['state_dict']
        assert all(torch.isfinite(t).all() for t in state.values())
    if (out / 'checkpoint.pt').exists():
        state = torch.load(out / 'checkpoint.pt', weights_only=True)['objects']['model']
        assert all(torch.isfinite(t).all() for t in state.values())


def test_pretrained_network_keeps_its_own_input_statistics(tmp_path, tiny):
    first = tmp_path / 'first'
    tiny_run(tiny, first)
    again = tmp_path / 'again'  # a subset of the data has other statistics: the checkpoint's must be used
    tiny_run(tiny, again, '--pretrained', str(first / 'dense.pt'), '--subset', '24')
    dense = torch.load(first / 'dense.pt', weights_only=True)
    pruned = torch.load(again / 'pruned.pt', weights_only=True)
    assert pruned['mean'] == dense['mean'] and pruned['std'] == dense['std']


def test_final_mask_ranks_by_logits_beyond_float_saturation():
    policy = crl.Policy([3], 0.5)
    policy.theta.data = torch.tensor([20., 30., 25.])  # sigmoid rounds all three to 1.0 in float32
    cost = {'share': lambda kept: kept[:, 0].double() / 3}
    mask = crl.final_mask(policy, cost, torch.tensor([2 / 3], dtype=torch.float64))
    assert mask.tolist() == [0, 1, 1]


def test_existing_results_are_not_overwritten(tmp_path, tiny):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'results.json').write_text('precious')
    with pytest.raises(SystemExit, match='--overwrite'):
        tiny_run(tiny, out)
    assert (out / 'results.json').read_text() == 'precious'


def test_cli_error_is_one_line_on_stderr_with_nonzero_exit():
    r = subprocess.run([sys.executable, os.path.join(HERE, 'crl_prune.py'), '--budget', 'params=abc'],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode != 0
    assert r.stderr.strip().count('\n') == 0 and 'params=abc' in r.stderr and r.stdout == ''


# --- Part II, 17. The command line, end to end ------------------------------------------------------------------------

def test_end_to_end_tiny_run(tmp_path, tiny):
    out = tmp_path / 'out'
    results = tiny_run(tiny, out, '--budget', 'params=0.3,macs=0.5',
                        '--speed', 'eager,folded')
    saved = json.loads((out / 'results.json').read_text())
    assert saved['budget_met'] is True and saved['budget'] == {'params': 0.3, 'macs': 0.5}
    assert saved['pruned']['params'] <= 0.3 * saved['dense']['params']
    assert saved['pruned']['macs'] <= 0.5 * saved['dense']['macs']
    for part in ('dense', 'pruned'):
        assert {'params', 'macs', 'accuracy'} <= set(saved[part])
    assert set(saved['time_s']) >= {'dense', 'prune', 'finetune'}
    assert [(r['mode'], r['batch']) for r in saved['speed']] == [('eager', 1), ('eager', 64), ('folded', 1),
                                                                 ('folded', 64)]
    for r in saved['speed']:
        assert r['dense_ms'] > 0 and r['pruned_ms'] > 0 and r['speedup'] == pytest.approx(r['dense_ms'] / r['pruned_ms'])
        assert r['macs_ratio'] == pytest.approx(saved['dense']['macs'] / saved['pruned']['macs'])
    assert list(saved['channels']) == [f'conv{i}' for i in range(1, 9)] + ['fc1']
    ckpt = torch.load(out / 'pruned.pt', weights_only=True)
    assert ckpt['widths'] == list(saved['channels'].values())
    small, _ = crl.load_pruned(out / 'pruned.pt')
    assert sum(p.numel() for p in small.parameters()) == saved['pruned']['params']
    dense, _ = crl.load_pruned(out / 'dense.pt')
    assert sum(p.numel() for p in dense.parameters()) == saved['dense']['params']
    assert results['pruned']['accuracy'] == saved['pruned']['accuracy']
    # the dense checkpoint can seed a second run, which then skips dense training
    again = tiny_run(tiny, tmp_path / 'again', '--pretrained', str(out / 'dense.pt'),
                      '--prune-epochs', '1', '--finetune-epochs', '0')
    assert again['dense']['accuracy'] == saved['dense']['accuracy']


def test_reinit_keeps_the_widths_and_drops_the_inherited_weights(tmp_path, tiny):
    runs = {flag: tiny_run(tiny, tmp_path / str(i), '--finetune-epochs', '0', *flag)
            for i, flag in enumerate(((), ('--reinit',)))}
    assert runs[()]['channels'] == runs[('--reinit',)]['channels']  # same seed, same policy, same widths
    weights = [torch.load(tmp_path / str(i) / 'pruned.pt', weights_only=True)['state_dict']['convs.0.layer.weight']
               for i in range(2)]
    dense = torch.load(tmp_path / '0' / 'dense.pt', weights_only=True)['state_dict']['convs.0.layer.weight']
    closest = [max(F.cosine_similarity(w[0].flatten(), d.flatten(), 0).item() for d in dense) for w in weights]
    assert closest[0] > 0.95  # fine-tuning starts from the filters the dense network (then pruning) trained
    assert closest[1] < 0.9   # --reinit from fresh ones


def test_script_runs_resnet18_from_the_command_line(tmp_path, tiny):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, os.path.join(HERE, 'crl_prune.py'), *TINY, '--arch', 'resnet18',
                        '--data', tiny, '--out', str(out), '--budget', 'macs=0.4'],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert 'prune epoch 1' in r.stdout and 'lam macs=' in r.stdout
    saved = json.loads((out / 'results.json').read_text())
    assert saved['budget_met'] and saved['pruned']['macs'] <= 0.4 * saved['dense']['macs']


# --- Part II, 17. Several processes: torchrun, gloo on the CPU ---------------------------------------------------------

def torchrun(tmp_path, argv, processes=2, patch=''):
    """`torchrun --nproc_per_node N crl_prune.py ARGV` (through a launcher that first runs `patch`, Python code that
    may replace parts of crl_prune, as the tests' monkeypatching does in one process)."""
    launcher = tmp_path / 'launch.py'
    launcher.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport crl_prune as crl\n{patch}\n"
                        f"crl.main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}',
                           str(launcher), *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


INTERRUPT = """
real, calls = crl.Progress.add, []
def add(self, *a, **k):
    calls.append(1)
    if len(calls) == {step}:
        raise KeyboardInterrupt
    return real(self, *a, **k)
crl.Progress.add = add
"""


def test_two_processes_prune_as_one_and_resume(tmp_path, tiny):
    """Two processes (torchrun, gloo): they end with one policy and one mask (else the run fails: `identical`), meet
    the budget, and process 0 alone writes the files and the lines; interrupted in pruning and resumed, the run ends
    where the uninterrupted one does."""
    argv = [*RESUMABLE, '--data', tiny, '--batch-size', '6']
    whole = torchrun(tmp_path, [*argv, '--out', str(tmp_path / 'whole')])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count('dense accuracy') == 1 and whole.stdout.count('x 2 processes') == 1
    r = json.load(open(tmp_path / 'whole' / 'results.json'))
    assert r['processes'] == 2 and r['budget_met'] and r['fractions']['params'] <= 0.3
    rows = list(csv.DictReader(open(tmp_path / 'whole' / 'metrics.csv')))
    steps = [(row['phase'], row['step'], row['test_accuracy']) for row in rows]
    assert len(steps) == len(set(steps)) == 21  # 3 steps an epoch, 2 epochs a phase, and its test accuracy: once
    assert not [f for f in os.listdir(tmp_path / 'whole') if f.endswith('.tmp')]
    dense, _ = crl.load_pruned(str(tmp_path / 'whole' / 'dense.pt'))  # the accuracy of all test images, not a shard
    data = crl.load_data(crl.parse_args(['--data', tiny, *TINY]), crl.Numerics(torch.device('cpu')))
    assert crl.evaluate(dense, data) == r['dense']['accuracy']
    cut = torchrun(tmp_path, [*argv, '--out', str(tmp_path / 'cut')], patch=INTERRUPT.format(step=11))
    assert cut.returncode != 0 and 'interrupted' in cut.stderr and 'prune epoch 1' in cut.stderr
    with pytest.raises(SystemExit, match='processes 2'):  # its shards need as many processes as it had
        crl.main([*argv, '--out', str(tmp_path / 'cut'), '--resume'])
    resumed = torchrun(tmp_path, [*argv, '--out', str(tmp_path / 'cut'), '--resume'])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = json.load(open(tmp_path / 'cut' / 'results.json'))
    for key in ('channels', 'dense', 'pruned', 'multipliers', 'keep_probability_mean'):
        assert s[key] == r[key], key
    a, b = (torch.load(tmp_path / d / 'pruned.pt', weights_only=True)['state_dict'] for d in ('whole', 'cut'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_find_the_widths_one_process_finds(tmp_path, tiny):
    """The same global batch (2 x 6 images, or 12 in one process) and schedule: close widths, both within budget."""
    argv = [*TINY, '--data', tiny, '--prune-epochs', '4', '--budget', 'params=0.3']
    two = torchrun(tmp_path, [*argv, '--batch-size', '6', '--out', str(tmp_path / 'two')])
    assert two.returncode == 0, two.stderr[-3000:]
    one = tiny_run(tiny, tmp_path / 'one', '--prune-epochs', '4', '--budget', 'params=0.3')
    r = json.load(open(tmp_path / 'two' / 'results.json'))
    assert r['budget_met'] and one['budget_met']
    for name, cost in one['expected_cost_after_pruning'].items():
        assert r['expected_cost_after_pruning'][name] == pytest.approx(cost, abs=0.1)
    total = lambda res: sum(res['channels'].values())  # noqa: E731
    assert abs(total(r) - total(one)) <= 0.2 * total(one), (r['channels'], one['channels'])


LIBRARY_UNDER_TORCHRUN = """
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import crl_prune as crl
dist.init_process_group('gloo')
torch.manual_seed(0)  # the same seed in every process, as the README says
g = torch.Generator().manual_seed(dist.get_rank())  # each process its own shard of images
batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]


def mean(t):
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


small = crl.prune_network(crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 3), batches, {{'params': 0.3}},
                          prune_epochs=2, finetune_epochs=1, samples=2, wrap=torch.nn.parallel.DistributedDataParallel,
                          reduce=mean)
with open(sys.argv[1] + str(dist.get_rank()), 'w') as f:  # one file each: their prints would interleave
    json.dump({{'widths': crl.group_widths(small), 'count': crl.count(small),
               'state': [t.double().sum().item() for t in small.state_dict().values()]}}, f)
crl.end_processes()  # as the README ends it
"""


def test_the_library_call_under_torchrun_gives_every_process_one_network(tmp_path):
    """prune_network with the README's two hooks (DDP as `wrap`, a mean over processes as `reduce`) on two
    processes with different images: both end with the same network, within the budget."""
    (tmp_path / 'lib.py').write_text(LIBRARY_UNDER_TORCHRUN.format(here=HERE))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(tmp_path / 'lib.py'), str(tmp_path / 'rank')], capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = [json.load(open(tmp_path / f'rank{rank}')) for rank in (0, 1)]
    assert a == b
    dense = crl.count(crl.build('vgg11', crl.dense_widths('vgg11', 0.0625), 3))
    assert a['count'][0] <= 0.3 * dense[0]


def test_end_processes_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path):
    crl.end_processes()  # no process group: nothing to do
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        crl.end_processes()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_torchrun_refuses_a_device_it_cannot_split(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(SystemExit, match='--device cuda:1: under torchrun each process takes the GPU of its'):
        tiny_run(tiny, tmp_path / 'out', '--device', 'cuda:1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(SystemExit, match='2 processes on this machine but 1 GPU'):
        tiny_run(tiny, tmp_path / 'out', '--device', 'cuda')
    assert not os.path.exists(tmp_path / 'out')
