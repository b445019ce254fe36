"""The density frontier: RULER-style score vs the density SparseD actually keeps, per setting and length.

Settings (in this order, so a time-limited run keeps the most telling rows): dense; SparseD at the
paper's settings (skip 0.2, select 0.3, block 128); adaptive selection at mass 0.9 / 0.95 / 0.98;
select 0.1 / 0.2 / 0.5; block 32 / 64; skip 0 / 0.1 / 0.3 (and 0 / 0.1 at select 0.2); both selection scales; the two ablations
(sparse from step 0, sliding window at SparseD's density). At each length (4k / 8k / 16k):

  score     the suite's average (sparsed_engine/evaluation/ruler.py) with a 95% interval over its
            samples, and "within 1 pt": the per-sample full-match outcomes against dense's on the
            same prompts (McNemar, stats.py)
  depth     needle accuracy by depth third (start / middle / end), niah_single + niah_multikey
  density   kept tiles / all tiles of the patterns selected on this length's NLL windows (and, in
            frontier.json, per layer and head: "head_density", for benchmarks/equal_fidelity.py)
  NLL       masked-token NLL at mask ratio 0.3 of a 64-step nested schedule (measures.py)
  TF agree  teacher-forced top-1 agreement with dense and KL(dense || setting) (measures.py)

NLL and agreement read held-out text (the standard-library files the models never train on).
Diagnostics for the paper setting (`--diagnostics`): the share of dense attention mass its
pattern captures and the pattern's drift (Jaccard of the stored pattern with the one selection
would choose at each later step; the last step's value is the drift from the selection step).

Budget: --prompts-per-task, --lengths, --only (label substrings; dense always runs),
--max-minutes (stops between cells and still writes the partial table). Writes frontier.json,
frontier.md and (with matplotlib) frontier.png under --out.

    python -m benchmarks.frontier --model DIR --lengths 4096 8192 16384 --prompts-per-task 8 --max-minutes 9
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model_executor.model_loader import load_tokenizer
from sparsed_engine.evaluation import ablations
from sparsed_engine.evaluation.fidelity import windows
from sparsed_engine.evaluation.heldout import heldout_stream
from sparsed_engine.evaluation.measures import (Setting, dense_trajectory, make_llm, masked_nll,
                                                teacher_forced_agreement)
from sparsed_engine.evaluation.ruler import DEPTHS, TASKS, build_samples, evaluate
from sparsed_engine.evaluation.stats import mcnemar_p, mean_interval, within_points
from sparsed_engine.llm import DEFAULT_MODEL

NLL_RATIO, NLL_STEPS, AGREE_GEN = 0.3, 64, 32


def settings(block: int = 128) -> list[Setting]:
    """The frontier's settings; `block` is the paper's block (128; smaller for toy lengths)."""
    def sd(label, **cfg):
        return Setting(label, "sparsed", {"skip": 0.2, "select": 0.3, "block_size": block, **cfg})

    paper = {"skip": 0.2, "select": 0.3, "block_size": block}
    return ([Setting("dense", "dense"), sd(f"SparseD paper: skip=0.2 select=0.3 bs={block}")]
            + [sd(f"adaptive mass={m} bs={block}", mass=m) for m in (0.9, 0.95, 0.98)]
            + [sd(f"select={s} bs={block}", select=s) for s in (0.1, 0.2, 0.5)]
            + [sd(f"block={b} select=0.3", block_size=b) for b in (block // 4, block // 2)]
            + [sd(f"skip={s} select=0.3 bs={block}", skip=s) for s in (0.0, 0.1, 0.3)]
            # fewer tiles with an earlier selection: the skip that a 2x-at-64k setting needs
            + [sd(f"skip={s} select=0.2 bs={block}", skip=s, select=0.2) for s in (0.0, 0.1)]
            + [sd(f"selection_scale={s} select=0.3 bs={block}", selection_scale=s) for s in ("num_heads", "head_dim")]
            + [Setting(f"ablation: sparse from step 0, select=0.3 bs={block}", "sparsed_step0", paper),
               Setting(f"ablation: sliding window at SparseD density, bs={block}", "sparsed_window", paper)])


def pattern_diagnostics(model: str, setting: Setting, samples, device: str, max_len: int) -> dict:
    """Mean dense attention mass inside the kept tiles over all sparse steps, and the mean Jaccard
    of the stored pattern with a fresh selection at each sample's last step (every layer)."""
    probe = Setting(setting.label, "sparsed_probe", setting.attention_config)
    llm = make_llm(model, probe, device, max_len)
    backend = llm.llm_engine.executor.worker.backend
    layers = backend.layout.num_layers
    mass, last_jaccard = [], []
    for s in samples:
        backend.records.clear()
        evaluate(llm, [s])
        mass += [r["mass"] for r in backend.records]
        last_jaccard += [r["jaccard"] for r in backend.records[-layers:]]
    llm.shutdown()
    return {"mass_captured": sum(mass) / max(len(mass), 1), "jaccard_last_step": sum(last_jaccard) / max(len(last_jaccard), 1)}


def run(model: str, lengths: list[int], per_task: int, device: str, max_minutes: float | None,
        only: list[str] | None = None, block: int = 128, tasks=TASKS, nll_docs: int = 4,
        agree_prompts: int = 4, diagnostics: bool = True, seed: int = 0, log=print) -> dict:
    """{"results": {label: {length: cell}}, "diagnostics": {length: ...}, "stopped_early": bool}."""
    t0 = time.time()
    out_of_time = (lambda: max_minutes is not None and time.time() - t0 > 60 * max_minutes)
    ablations.register()
    chosen = [s for s in settings(block) if s.label == "dense" or not only or any(o in s.label for o in only)]
    tok = load_tokenizer(model)
    stream = heldout_stream(tok)
    max_len = max(lengths)
    samples = {n: build_samples(tok, n, per_task, seed, [t for t in tasks if t != "common_words" or n > 256])
               for n in lengths}
    docs = {n: windows(stream, n, nll_docs, seed + n) for n in lengths}
    dense_llm = make_llm(model, chosen[0], device, max_len)
    trajectories = {n: dense_trajectory(dense_llm, windows(stream, n - AGREE_GEN, agree_prompts, seed + 1 + n),
                                        AGREE_GEN, AGREE_GEN // 2, AGREE_GEN) for n in lengths}
    dense_llm.shutdown()
    results, stopped = {}, False
    for setting in chosen:
        llm = make_llm(model, setting, device, max_len)
        row = {}
        for n in lengths:
            if out_of_time():
                stopped = True
                break
            suite = evaluate(llm, samples[n])
            density = {}
            nll = masked_nll(llm, setting, docs[n], NLL_RATIO, seed + 3, NLL_STEPS, density)
            top1, kl = teacher_forced_agreement(llm, setting, trajectories[n])
            row[n] = {"score": suite["average"], "tasks": suite["tasks"], "depth": suite["depth"],
                      "interval": mean_interval(suite["scores"]),
                      "full_match": [s == 1.0 for s in suite["scores"]], "nll": nll,
                      "density": density.get("density", 1.0), "head_density": density.get("head_density"),
                      "agree_tf": top1, "kl_tf": kl}
            log(f"{setting.label} @ {n}: score {suite['average']:.3f} density {row[n]['density']:.3f} "
                f"NLL {nll:.4f} TF {top1:.3f} ({time.time() - t0:.0f}s)")
        llm.shutdown()
        if row:
            results[setting.label] = row
        if stopped:
            break
    diag = {}
    if diagnostics and len(chosen) > 1 and not out_of_time():
        paper = chosen[1]
        for n in lengths:
            if out_of_time():
                stopped = True
                break
            niah = [s for s in samples[n] if s.task == "niah_single"]
            diag[n] = pattern_diagnostics(model, paper, niah, device, max_len)
            log(f"diagnostics {paper.label} @ {n}: {diag[n]}")
    return {"results": results, "diagnostics": diag, "stopped_early": stopped,
            "settings": {s.label: [s.backend, s.attention_config] for s in chosen}}


def table(run_out: dict) -> str:
    results = run_out["results"]
    dense = results.get("dense", {})
    lengths = sorted({n for r in results.values() for n in r})
    head = ([f"score@{n} [95% CI] (within 1 pt, p)" for n in lengths] + [f"density@{n}" for n in lengths]
            + [f"depth s/m/e @{lengths[-1]}"] + [f"NLL@{n}" for n in lengths] + [f"TF agree@{n} (KL)" for n in lengths])
    lines = ["| setting | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, r in results.items():
        cells = []
        for n in lengths:
            if n not in r:
                cells.append("-")
                continue
            verdict = ""
            if n in dense and label != "dense":
                a, b = dense[n]["full_match"], r[n]["full_match"]
                verdict = f" ({within_points(a, b)}, {mcnemar_p(a, b):.2g})"
            lo, hi = r[n]["interval"]
            cells.append(f"{100 * r[n]['score']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]{verdict}")
        cells += [f"{r[n]['density']:.3f}" if n in r else "-" for n in lengths]
        last = r.get(lengths[-1])
        cells.append("/".join(f"{100 * last['depth'][d]:.0f}" if d in last["depth"] else "-" for d in DEPTHS)
                     if last else "-")
        cells += [f"{r[n]['nll']:.4f}" if n in r else "-" for n in lengths]
        cells += [f"{100 * r[n]['agree_tf']:.1f}% ({r[n]['kl_tf']:.3f})" if n in r else "-" for n in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n, d in run_out["diagnostics"].items():
        lines.append(f"\nDiagnostics @{n}: dense attention mass captured {100 * d['mass_captured']:.1f}%, "
                     f"pattern Jaccard selection->last step {d['jaccard_last_step']:.3f}")
    if run_out["stopped_early"]:
        lines.append("\n(stopped at --max-minutes: the table is partial)")
    return "\n".join(lines)


def plot(run_out: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    markers = "osD^v<>"
    lengths = sorted({n for r in run_out["results"].values() for n in r})
    for label, r in run_out["results"].items():
        style = "--" if label.startswith("ablation") else "-"
        xs = [r[n]["density"] for n in lengths if n in r]
        ys = [100 * r[n]["score"] for n in lengths if n in r]
        ax.plot(xs, ys, style, alpha=0.4)
        for n, x, y in zip([n for n in lengths if n in r], xs, ys):
            ax.scatter(x, y, marker=markers[lengths.index(n) % len(markers)], s=30)
        if xs:
            ax.annotate(label, (xs[-1], ys[-1]), fontsize=6)
    ax.set(xlabel="achieved density (kept tiles / all tiles)", ylabel="RULER-style average (%)",
           title=title + "\nmarkers: " + ", ".join(f"{m}={n}" for m, n in zip(markers, lengths)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(run_out: dict, out: Path, title: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = table(run_out)
    (out / "frontier.json").write_text(json.dumps({"title": title, **run_out}, indent=1, default=str))
    (out / "frontier.md").write_text(f"### {title}\n\n{md}\n")
    try:
        if run_out["results"]:
            plot(run_out, out / "frontier.png", title)
    except ImportError:
        print("matplotlib is not installed: no frontier.png")
    return md


def load(path: Path) -> dict:
    """frontier.json with its lengths as ints again (JSON keys are strings)."""
    run_out = json.loads(Path(path).read_text())
    run_out["results"] = {label: {int(n): c for n, c in row.items()} for label, row in run_out["results"].items()}
    run_out["diagnostics"] = {int(n): d for n, d in run_out.get("diagnostics", {}).items()}
    return run_out


def merge(base: dict, extra: dict) -> dict:
    """`extra`'s rows added to `base`: a frontier measured in parts (each GPU call has a time box).
    The paired tests compare every row with base's dense, so both runs must have scored the same
    prompts: their dense rows must match sample for sample."""
    for n, cell in extra["results"]["dense"].items():
        mine = base["results"]["dense"].get(n)
        if mine is None or mine["full_match"] != cell["full_match"]:
            raise ValueError(f"dense @ {n} differs between the runs (other prompts or another model): not merged")
    rows = {k: v for k, v in extra["results"].items() if k != "dense"}
    return {**base, "results": {**base["results"], **rows}, "settings": {**base["settings"], **extra["settings"]},
            "diagnostics": {**base["diagnostics"], **extra["diagnostics"]}, "stopped_early": extra["stopped_early"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--prompts-per-task", type=int, default=8)
    ap.add_argument("--block", type=int, default=128, help="the paper's block size (smaller for toy lengths)")
    ap.add_argument("--only", nargs="+", default=None, help="settings whose label contains one of these (dense always)")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--no-diagnostics", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--merge-into", default=None,
                    help="an earlier frontier.json (same model, prompts and lengths): write it with this run's rows added")
    args = ap.parse_args()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    run_out = run(args.model, args.lengths, args.prompts_per_task, args.device, args.max_minutes, args.only,
                  args.block, diagnostics=not args.no_diagnostics)
    title = f"Frontier, {Path(args.model).name}, {args.prompts_per_task} prompts per task, {device_name}"
    if args.merge_into:
        base = load(Path(args.merge_into))
        added = sorted(set(run_out["results"]) - {"dense"})
        base_title = base.pop("title", title)
        try:
            run_out, title = merge(base, run_out), f"{base_title}; rows {added} from a second run"
        except ValueError as e:   # keep this run's rows: written alone, and said why
            print(f"{args.merge_into}: {e}")
            title += f" (not merged into {args.merge_into}: {e})"
    print(f"\n{title}\n{write(run_out, Path(args.out), title)}")


if __name__ == "__main__":
    main()
