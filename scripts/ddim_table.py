"""The DDIM table of section 11.1 at full sample size, on whatever device is here.

Quick mode (the CPU build of the book) uses 48 samples per cell, too few for the FD to separate the
rows. This script measures the same table with many samples: the shipped Fashion-MNIST model, DDIM
with S steps and eta in {0, 1}, plus the paper's own sampler (Algorithm 2, sigma_t^2 = beta_t, 1000
steps), each cell from the same starting noise, FD (Fashion-MNIST classifier) with its real-vs-real
baseline at the same n. Rows are written to the JSON file as they finish, so a long run that is
stopped still leaves every finished row.

    python scripts/ddim_table.py --n 1000 --steps 10 20 50 100 --ddpm --out table.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import ddpm_lib
from ddpm_lib import ddim_sample, ddpm_sample, fd_fashion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="samples per cell")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 1000], help="DDIM steps S")
    ap.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--ddpm", action="store_true", help="also the paper's Algorithm 2 with 1000 steps")
    ap.add_argument("--batch", type=int, default=250, help="samples per sampler call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ddpm_lib.default_device()
    model, diffusion, config = ddpm_lib.load_pretrained("fashion-mnist", map_location=device)
    model.eval()
    shape = (1, 32, 32)
    # the same starting noise for every cell
    x_T = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(args.seed)).to(device)
    result = dict(model=f"shipped {config['model']['preset']}, {config['step']} steps", n=args.n,
                  device=str(device), cpu=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), torch=torch.__version__, rows=[])
    if device.type == "cuda":
        result["card"] = torch.cuda.get_device_name()

    def run(name, sample_fn):
        start = time.perf_counter()
        parts = []
        for i in range(0, args.n, args.batch):
            g = torch.Generator(device=device).manual_seed(args.seed + 1 + i)
            parts.append(sample_fn(x_T[i:i + args.batch], g).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - start
        r = fd_fashion(torch.cat(parts), n=args.n)
        row = dict(sampler=name, fd=round(r.fd, 2), baseline=round(r.baseline, 2),
                   ms_per_image=round(1000 * secs / args.n, 2), seconds=round(secs, 1))
        result["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"{name:24s} FD {row['fd']:8.2f}  real vs real {row['baseline']:6.2f}  "
              f"{row['ms_per_image']:9.2f} ms/image", flush=True)

    T = diffusion.num_timesteps
    jobs = [(f"DDIM S={S} eta={eta:g}", S, lambda x, g, S=S, eta=eta: ddim_sample(
                model, diffusion, x.shape, x_T=x, steps=S, eta=eta, generator=g, progress=False))
            for S in sorted(args.steps) for eta in args.etas
            if not (args.ddpm and S == T and eta == 1.0)]  # ~ the DDPM row (beta-tilde for beta): skipped
    if args.ddpm:  # before the slow DDIM rows with more than 100 steps
        k = next((i for i, (_, S, _) in enumerate(jobs) if S > 100), len(jobs))
        jobs.insert(k, (f"DDPM (Algorithm 2) {T}", T, lambda x, g: ddpm_sample(
            model, diffusion, x.shape, x_T=x, generator=g, progress=False)))
    for name, _, sample_fn in jobs:
        run(name, sample_fn)

if __name__ == "__main__":
    main()
