"""Is SparseD lossless on a trained model? The fidelity run of sparsed_engine/evaluation/fidelity.py
(its docstring defines every measure): dense vs SparseD settings vs the two ablations.

Prints a table, writes a PNG and JSON under --out, and appends the table to benchmarks/RESULTS.md
with the device name and date.

    python -m benchmarks.fidelity                       # GPU, full scale (500 passkey prompts a length)
    python -m benchmarks.fidelity --small --device cpu  # CPU, small scale (~3 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import textwrap
from pathlib import Path

import torch

from sparsed_engine.evaluation.fidelity import FULL, SMALL, run, table
from sparsed_engine.llm import DEFAULT_MODEL

RESULTS_MD = Path(__file__).with_name("RESULTS.md")


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    fig, axes = plt.subplots(1, 3, figsize=(20, 5.5), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    for label, r in results.items():
        style = "--" if label.startswith("ablation") else "-"
        axes[0].plot(list(r["passkey"]), [100 * a for a in r["passkey"].values()], style, marker="o", label=label)
        axes[1].plot(list(r["nll"]), [100 * (v / dense["nll"][k] - 1) for k, v in r["nll"].items()], style,
                     marker="o", label=label)
    labels = [k for k in results if k != "dense"]
    means = [100 * sum(results[k]["agree_tf"].values()) / len(results[k]["agree_tf"]) for k in labels]
    axes[2].barh(range(len(labels)), means)
    axes[2].set_yticks(range(len(labels)), [textwrap.fill(k, 34) for k in labels], fontsize=7)
    axes[0].set(xlabel="canvas length (tokens)", ylabel="passkey accuracy (%)", title="(a) passkey retrieval",
                ylim=(-3, 103))
    axes[1].set(xlabel="mask ratio", ylabel="masked-token NLL vs dense (%)", title="(b) NLL change")
    axes[2].set(xlabel="teacher-forced top-1 equal to dense (%)", title="(c) agreement with dense")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--small", action="store_true", help="CPU scale (short canvases, few samples)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=None, help="passkey prompts per length")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--results-md", default=str(RESULTS_MD))
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the settings whose label contains one of these (dense always runs)")
    args = ap.parse_args()
    scale = SMALL if args.small else FULL
    if args.only:
        scale = dataclasses.replace(scale, settings=[s for s in scale.settings if s.label == "dense"
                                                     or any(o in s.label for o in args.only)])
    if args.samples:
        scale = dataclasses.replace(scale, passkey_samples=args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    results = run(args.model, scale, args.device)
    md = table(results)
    stamp = datetime.date.today().isoformat()
    title = (f"Fidelity, {'small' if args.small else 'full'} scale, {Path(args.model).name}, "
             f"{device_name}, torch {torch.__version__}, {stamp}")
    (out / "fidelity.json").write_text(json.dumps({"title": title, "scale": dataclasses.asdict(scale),
                                                   "results": results}, indent=2, default=str))
    plot(results, out / "fidelity.png", title)
    with open(args.results_md, "a") as f:
        f.write(f"\n## Fidelity (`python -m benchmarks.fidelity{' --small' if args.small else ''}`)\n### {title}\n\n"
                f"{scale.passkey_samples} passkey prompts per length, {scale.nll_docs} NLL windows of "
                f"{scale.nll_length} tokens, {scale.agree_prompts} continuations of {scale.agree_gen} tokens "
                f"per length; NLL over a {scale.nll_steps}-step nested schedule. Plot: {out / 'fidelity.png'}.\n\n{md}\n")
    print(f"\n{title}\n{md}")


if __name__ == "__main__":
    main()
