"""Does the test suite notice when the method is mis-wired? Applies each mutation below to crl_prune.py (or, where
the entry names it, crl_tp.py) in turn, runs the suite (stopping at its first failure), prints which test caught it,
and restores the file.

    python bench/mutations.py                 # all mutations, a few minutes on 2 cores
    python bench/mutations.py sign            # those whose name contains 'sign'

Every mutation must be CAUGHT; a NOT CAUGHT line is a promise of the method that no test guards.
"""
import os
import subprocess
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
os.chdir(HERE)
M = [  # name, text in crl_prune.py, what replaces it (and the file, if not crl_prune.py)
 ('reward sign flipped', '    reward = -(reduce or (lambda t: t))(ce.detach())', '    reward = (reduce or (lambda t: t))(ce.detach())'),
 ('rewards not averaged over processes', '    reward = -(reduce or (lambda t: t))(ce.detach())', '    reward = -ce.detach()'),
 ('masks from the global random stream', '    masks = policy.sample(samples, generator)', '    masks = policy.sample(samples)'),
 ('BN statistics not averaged over processes', '        if reduce:\n            m.running_mean.copy_', '        if False:\n            m.running_mean.copy_'),
 ('evaluation counts one process\'s shard', "    return all_reduce(correct, 'sum').item()", "    return correct.item()"),
 ('random resized crop never flips', '    flip = torch.where(torch.rand(n, **g) < 0.5, -1.0, 1.0)', '    flip = torch.ones(n, device=x.device)'),
 ('test images not resized as the recipe', '    return size if train or size <= 32 else round(size / 0.875)', '    return size'),
 ('a folder ignores --subset', "            self.samples, self.labels = [self.samples[i] for i in keep.tolist()], self.labels[keep]", "            pass"),
 ('images paired wrongly', 'model(torch.cat([x] * samples), policy.split(masks))', 'model(x.repeat_interleave(samples, 0), policy.split(masks))'),
 ('policy optimiser never stepped', '    opt_w.step()\n    opt_p.step()\n', '    opt_w.step()\n'),
 ('weights not trained while pruning', '    opt_w.step()\n    opt_p.step()\n', '    opt_p.step()\n'),
 ('dual step never applied', "            state['integral'], state['lam'] = dual_step(state['integral'], cost.mean(0), target, dual_lr, damping,\n", "            state['integral'], _ = dual_step(state['integral'], cost.mean(0), target, dual_lr, damping,\n"),
 ('recalibrate_bn no-op', "    for m in bns:\n        m.reset_running_stats()\n        m.momentum = None", "    for m in []:\n        m.reset_running_stats()\n        m.momentum = None"),
 ('no recalibration at the end of training', '        if epoch == epochs:  # before the epoch', '        if False:  # before the epoch'),
 ('normalisation removed', 'xb = (x.float() / 255 - mean) / std', 'xb = x.float() / 255'),
 ('evaluate in train mode', '    model.eval()\n    correct', '    model.train()\n    correct'),
 ('BN statistics shared across masks', 'per_slice = n_masks > 1 and self.training', 'per_slice = False and self.training'),
 ('final mask keeps the least probable', "order = policy.theta.detach().argsort(descending=True)", "order = policy.theta.detach().argsort(descending=False)"),
 ('baseline includes own reward', 'advantage = (lagrangian - lagrangian.mean()) * n / (n - 1)', 'advantage = lagrangian'),
 ('baseline is the batch maximum', 'advantage = (lagrangian - lagrangian.mean()) * n / (n - 1)', 'advantage = lagrangian - lagrangian.max()'),
 ('training batches not augmented', '            if self.train:\n                xb = crop(xb, augmentation)\n', ''),
 ('cost term sign flipped', 'lagrangian = reward - (cost - budget) @ lam', 'lagrangian = reward + (cost - budget) @ lam'),
 ('control variate dropped', '    slopes = cost_slopes(policy, costs) if control_variate else None\n', '    slopes = None\n'),
 ('budget annealed over a third of pruning', "lead=5.0, init_keep=0.9, anneal=1/6,", "lead=5.0, init_keep=0.9, anneal=1/3,"),
 ('integral step back to 0.01', "          dual_lr=0.05, damping=100.0,", "          dual_lr=0.01, damping=100.0,"),
 ('proportional term on the current cost', "(integral + damping * (error + drift / budget)).clamp(min=0)", "(integral + damping * error).clamp(min=0)"),
 ('drift of the wrong sign', "lead * (state['expected'] - expected))", "lead * (expected - state['expected']))"),
 ('no lead by default', "damping=100.0, lead=5.0,", "damping=100.0, lead=0.0,"),
 ('budget not annealed', "            target = state['start'] ** (1 - s) * budget ** s\n", '            target = budget\n'),
 ('dual ascent sign flipped', 'integral = (integral + eta * error.clamp(-1, 1)).clamp(min=0)', 'integral = (integral - eta * error.clamp(-1, 1)).clamp(min=0)'),
 ('compact ignores BN stats', "nn.Parameter(sliced, t.requires_grad) if isinstance(t, nn.Parameter) else sliced)",
  "nn.Parameter(sliced, t.requires_grad) if isinstance(t, nn.Parameter) else sliced * (name != 'running_mean'))"),
 ('depthwise weight sliced on its input dim', "pairs = [(0, self.out)] + ([] if self.depthwise else [(1, self.inp)])", "pairs = [(0, self.out), (1, self.inp)]"),
 ('costs ignore parameters outside Units', "    matrices['params'][0, 0] += sum(p.numel() for p in model.parameters() if id(p) not in seen)\n", ''),
 ('fold_bn forgets the mean', "bias = (0 if layer.bias is None else layer.bias) - bn.running_mean", "bias = (0 if layer.bias is None else layer.bias) - 0 * bn.running_mean"),
 ('latency search never grows', "        lo, hi = (i, hi) if meets(i) else (lo, i)", "        lo, hi = (i, i + 1) if meets(i) else (lo, i)"),
 ('degenerate fit kept', "'degenerate': bool(r2 < 0.5 or (predicted <= 0).any() or predicted[0] <= predicted[3])}", "'degenerate': False}"),
 ('scattered timings not taken again', "        if max(s for _, s in best) <= scatter:", "        if True:"),
 ('resume forgets the random streams', "        torch.set_rng_state(self.state['rng']['cpu'])", "        pass"),
 ('resume forgets the optimisers', "                obj.load_state_dict(saved)\n", "                obj.load_state_dict(saved) if isinstance(obj, nn.Module) else None\n"),
 ('resume forgets the multipliers', "                objects[name] = saved.to(obj.device)", "                pass"),
 ('resume repeats the saved epoch', "        return self.state['epoch'] + 1", "        return self.state['epoch']"),
 ('resume logs the redone epochs twice', "if at(r) < limit or at(r) == limit and not r['test_accuracy']]", "]"),
 ('overwrite leaves old exports', "map(self.path, ('results.json', 'checkpoint.pt', *EXPORTS))", "map(self.path, ('results.json', 'checkpoint.pt'))"),
 ('checkpoint written in place', "        torch.save(obj, path + '.tmp')\n    os.replace(path + '.tmp', path)", "        torch.save(obj, path)\n        return\n    os.replace(path + '.tmp', path)"),
 ('pretrained width ignored', "    args.width = saved.get('width', 1.0) if args.width is None else args.width", "    args.width = 1.0 if args.width is None else args.width"),
 ('latency prediction reads widths transposed', "self.flat[offsets + w[..., rows] * strides + w[..., cols]]", "self.flat[offsets + w[..., cols] * strides + w[..., rows]]"),
 ('latency choice not timed again', "    while lo > 0 and not meets(lo, rounds=5):", "    while False:"),
 ('time_forward takes the fastest call', "    median = times[repeats // 2]", "    median = times[0]"),
 ('running variance biased', "var.mean(0).flatten() * n / max(n - 1, 1)", "var.mean(0).flatten()"),
 ('traced BN statistics shared across masks', "        if len(self.masks) < 2 or not bn.training:", "        if True:", 'crl_tp.py'),
 ('traced masks on the wrong channels', "column[torch.tensor(item.idxs)] = offset + torch.tensor(item.root_idxs)", "column[torch.tensor(item.idxs)] = offset + torch.tensor(item.root_idxs).flip(0)", 'crl_tp.py'),
 ('traced hooks left on the model', "            for h in hooks:\n                h.remove()\n            self.masks = None", "            self.masks = None", 'crl_tp.py'),
 ('traced costs ignore the input channels', "        a, b = (list(affine[varying]) + [e0, e0])[:2]", "        a, b = (list(affine[varying][:1]) + [e0, e0])[:2]", 'crl_tp.py'),
 ('end_processes never leaves the process group', '        barrier()\n    torch.distributed.destroy_process_group()\n    time.sleep(0.1)', '        barrier()\n    time.sleep(0.1)'),
]
only = sys.argv[1:]
originals = {f: open(f).read() for f in ('crl_prune.py', 'crl_tp.py')}
try:
    for name, a, b, *where in M:
        if only and not any(o in name for o in only):
            continue
        path = where[0] if where else 'crl_prune.py'
        assert originals[path].count(a) == 1, f"mutation {name!r} no longer matches {path}: update it"
        open(path, 'w').write(originals[path].replace(a, b))
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider'],
                           capture_output=True, text=True)
        open(path, 'w').write(originals[path])
        failed = [line.split('::')[1].split(' ')[0] for line in r.stdout.splitlines()
                  if line.startswith(('FAILED', 'ERROR'))]
        print(f"{name:45} {'CAUGHT by ' + ', '.join(failed) if r.returncode else 'NOT CAUGHT'}", flush=True)
finally:
    for path, text in originals.items():
        open(path, 'w').write(text)
