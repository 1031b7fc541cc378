"""Images per second of crl_prune's two data paths: the decoded set in memory (batches gathered and augmented as
tensor ops on the device) and the streaming path (a DataLoader's worker processes decode every batch from the image
folder), with the one-time decoding the first one pays; each path alone, then with one training step of a network
per batch.

    python bench/loaders.py --data /tmp/tiny-imagenet-25 --workers 2 --arch vgg11 --width 0.25

Prints a markdown table: for each path, its set-up time (decoding the whole set, or none), training images per second
through Batches alone (decoded, normalised, augmented, on the device) and with a forward and backward pass of --arch.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import crl_prune as crl  # noqa: E402


def rate(batches, passes, step=None):
    """Training images per second over `passes` passes of `batches` (the first batch of each pass included)."""
    n, t0 = 0, time.time()
    for _ in range(passes):
        for x, y in batches:
            if step:
                step(x, y)
            n += len(y)
    crl.sync(x.device)
    return n / (time.time() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', required=True)
    p.add_argument('--image-size', type=int)
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--passes', type=int, default=2)
    p.add_argument('--arch', default='vgg11')
    p.add_argument('--width', type=float, default=0.25)
    p.add_argument('--device', default='auto')
    args = p.parse_args(argv)
    numerics = crl.Numerics(crl.get_device(args.device, '--device'))
    rows = []
    for loader in ('memory', 'stream'):
        size_flag = ['--image-size', str(args.image_size)] if args.image_size else []
        targs = crl.parse_args(['--data', args.data, '--loader', loader, '--workers', str(args.workers),
                                '--batch-size', str(args.batch_size), '--samples', '2', *size_flag])
        size, _ = crl.image_size(targs)
        crl.read_image_folder.cache_clear()
        t0 = time.time()
        data = crl.load_data(targs, numerics, size)
        setup = time.time() - t0
        batches = crl.Batches(data, 'train', args.batch_size, train=True)
        alone = rate(batches, args.passes)
        net = crl.network(args.arch, args.width, len(data['classes']), (3, size, size))
        model = numerics.place(net.model)
        opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)

        def step(x, y):
            with numerics.autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained = rate(batches, 1, step)
        rows.append((loader, size, len(data['train']), setup, alone, trained))
        print(rows[-1], flush=True)
    print(f"\n{numerics.device}, {args.workers} workers, batch {args.batch_size}, {args.arch} width {args.width}\n")
    print('| path | image size | train images | set-up s (decoding) | img/s, data alone | img/s, training |')
    print('|---|---|---|---|---|---|')
    for loader, size, n, setup, alone, trained in rows:
        print(f"| {loader} | {size} | {n:,} | {setup:.1f} | {alone:,.0f} | {trained:,.0f} |")


if __name__ == '__main__':
    main()
