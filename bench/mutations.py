"""Does the test suite notice when the method is mis-wired? Applies each mutation below to crl_prune.py in turn, runs
the suite (stopping at its first failure), prints which test caught it, and restores the file.

    python bench/mutations.py                 # all mutations, a few minutes on 2 cores
    python bench/mutations.py sign            # those whose name contains 'sign'

Every mutation must be CAUGHT; a NOT CAUGHT line is a promise of the method that no test guards.
"""
import os
import subprocess
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
os.chdir(HERE)
orig = open('crl_prune.py').read()
M = [  # name, text in crl_prune.py, what replaces it
 ('reward sign flipped', 'reinforce_loss(policy, masks, -ce.detach()', 'reinforce_loss(policy, masks, ce.detach()'),
 ('images paired wrongly', 'model(torch.cat([x] * k), policy.split(masks))', 'model(x.repeat_interleave(k, 0), policy.split(masks))'),
 ('policy optimiser never stepped', '            opt_p.step()\n', ''),
 ('dual step never called', '            integral, lam = dual_step(integral, cost.mean(0), budget, args.dual_lr, args.damping)\n', ''),
 ('recalibrate_bn no-op', "    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]\n    for m in bns:\n        m.reset_running_stats()", "    return\n    bns = []\n    for m in bns:\n        m.reset_running_stats()"),
 ('normalisation removed', 'xb = (x[idx].float() / 255 - mean) / std', 'xb = x[idx].float() / 255'),
 ('evaluate in train mode', '    model.eval()\n    correct', '    model.train()\n    correct'),
 ('weights not trained while pruning', '            opt_w.step()\n', ''),
 ('BN statistics shared across masks', 'per_slice = k > 1 and self.training', 'per_slice = False and self.training'),
 ('final mask keeps the least probable', "order = policy.theta.detach().argsort(descending=True)", "order = policy.theta.detach().argsort(descending=False)"),
 ('baseline includes own reward', 'advantage = (lagrangian - lagrangian.mean()) * k / (k - 1)', 'advantage = lagrangian'),
 ('cost term sign flipped', 'lagrangian = reward - (cost - budget) @ lam', 'lagrangian = reward + (cost - budget) @ lam'),
 ('dual ascent sign flipped', 'integral = (integral + eta * error).clamp(min=0)', 'integral = (integral - eta * error).clamp(min=0)'),
 ('compact ignores BN stats', "            target.copy_(t)", "            target.copy_(t) if t.dim() > 1 else None"),
 ('resume forgets the random streams', "        torch.set_rng_state(self.state['rng']['cpu'])", "        pass"),
 ('resume forgets the optimisers', "obj.copy_(saved) if isinstance(obj, torch.Tensor) else obj.load_state_dict(saved)",
  "obj.copy_(saved) if isinstance(obj, torch.Tensor) else (obj.load_state_dict(saved) if isinstance(obj, nn.Module) else 0)"),
 ('resume forgets the multipliers', "obj.copy_(saved) if isinstance(obj, torch.Tensor) else obj.load_state_dict(saved)",
  "0 if isinstance(obj, torch.Tensor) else obj.load_state_dict(saved)"),
 ('resume repeats the saved epoch', "        return self.state['epoch'] + 1", "        return self.state['epoch']"),
 ('resume logs the redone epochs twice', "if at(r) < limit or at(r) == limit and not r['test_accuracy']]", "]"),
 ('overwrite leaves old exports', "[outputs[0], outputs[3], *outputs[4:]]", "[outputs[0], outputs[3]]"),
 ('checkpoint written in place', "    torch.save(obj, path + '.tmp')\n    os.replace(path + '.tmp', path)", "    torch.save(obj, path)"),
]
only = sys.argv[1:]
try:
    for name, a, b in M:
        if only and not any(o in name for o in only):
            continue
        assert orig.count(a) == 1, f"mutation {name!r} no longer matches crl_prune.py: update it"
        open('crl_prune.py', 'w').write(orig.replace(a, b))
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider'],
                           capture_output=True, text=True)
        failed = [line.split('::')[1].split(' ')[0] for line in r.stdout.splitlines() if line.startswith('FAILED')]
        print(f"{name:40} {'CAUGHT by ' + ', '.join(failed) if r.returncode else 'NOT CAUGHT'}", flush=True)
finally:
    open('crl_prune.py', 'w').write(orig)
