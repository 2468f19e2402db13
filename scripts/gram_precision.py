"""How much does a Gram store's dtype change a RegMean merge? (Why Gram stores default to float32.)

Two synthetic "models" see activations X_m [tokens, n] with a decaying spectrum (down to
``--floor``), a few outlier channels, and their own random rotation; W_2 is W_1 plus a small
update. The exact float64 RegMean merge is compared with the merge from Grams rounded to each
store dtype, as the relative output error max_m ||X_m (W - W*)^T|| / ||X_m W*^T||, next to the
same error for plain averaging (the size of what RegMean changes). Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch


def activations(n: int, tokens: int, floor: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, floor, n, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * spectrum.sqrt() @ rotation.T
    x[:, :4] *= 30  # outlier channels, as in LLM activations
    return x


def regmean(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    scaled = [alpha * g + (1 - alpha) * torch.diag(g.diagonal()) for g in grams]
    rhs = sum(g @ w.T for g, w in zip(scaled, weights))
    return torch.linalg.solve(sum(scaled), rhs).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="layer input width")
    parser.add_argument("--out", type=int, default=256, help="layer output width")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--floor", type=float, default=-7, help="log10 of the smallest eigenvalue")
    args = parser.parse_args()
    torch.manual_seed(0)
    xs = [activations(args.n, args.tokens, args.floor, seed) for seed in (1, 2)]
    grams = [x.T @ x / args.tokens for x in xs]
    w1 = torch.randn(args.out, args.n, dtype=torch.float64) / args.n**0.5
    weights = [w1, w1 + 0.1 * torch.randn_like(w1) / args.n**0.5]

    def error(w: torch.Tensor, ref: torch.Tensor) -> float:
        return max(float((x @ (w - ref).T).norm() / (x @ ref.T).norm()) for x in xs)

    print(f"n {args.n}, out {args.out}, tokens {args.tokens}, spectrum floor 1e{args.floor:g}")
    print("| alpha | store dtype | output error vs exact | averaging vs exact | min eig. sum G |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for alpha in (0.9, 1.0):
        exact = regmean(grams, weights, alpha)
        average = error(sum(weights) / 2, exact)
        for dtype in (torch.float32, torch.bfloat16):
            rounded = [g.to(dtype).to(torch.float64) for g in grams]
            merged = regmean(rounded, weights, alpha)
            lowest = float(torch.linalg.eigvalsh(sum(rounded)).min())
            name = str(dtype).removeprefix("torch.")
            print(
                f"| {alpha} | {name} | {error(merged, exact):.1e} | {average:.1e} | {lowest:.1e} |"
            )


if __name__ == "__main__":
    main()
