"""Speed at equal fidelity (issue 12, part 5): the sparsest SparseD setting the frontier found within
1 point of dense, timed on the LLaDA-8B shape at 64k with patterns drawn at its measured density.

1. Choice, from frontier.json (benchmarks/frontier.py): every non-dense setting is judged at every
   length dense was measured at, as the frontier judges "within 1 pt" (stats.within_points on the
   per-sample full-match outcomes, McNemar on the same prompts): it passes only with "yes" at every
   length; a length where dense solves no prompt judges nothing ("vacuous") and fails. The passing
   setting with the lowest mean density (over those lengths) is chosen; the ablations are listed but
   are not candidates. `--setting LABEL` overrides. When none passes the
   paper setting is measured instead and labelled NOT at equal fidelity.
2. Patterns (sparsed_engine/evaluation/drawn.py): the chosen setting's per-(layer, head) densities
   at the longest length that has them are mapped onto LLaDA-8B's 32 x 32 heads by a balanced
   resample (each measured head copied equally often, up to one; the copies shuffled within their
   source layer and laid out in depth order, so a target layer holds the densities measured at its
   relative depth), and each head keeps round(density * nb) key blocks in every query block: the
   diagonal block, then the others by SparseD's block importance on this step's q/k (random
   weights: the importance is real but carries no structure). Same pool and kernels as SparseD.
3. Timing, through LLMEngine.step as benchmarks/e2e.py does: a dense step with cuDNN and with FA2
   (SPARSED_SDPA_BACKEND), then, for SparseD at the paper's settings and for the drawn patterns,
   the selection step and a sparse step; 1,024-step totals computed with each setting's own
   schedule (its skip), speedups over cuDNN-dense and FA2-dense.

Writes equal_fidelity.md, equal_fidelity.json and equal_fidelity.png under --out.

    python3 -m benchmarks.equal_fidelity --frontier benchmarks/frontier.json --out $OUT   # one H200, ~3 min
    python3 -m benchmarks.equal_fidelity --frontier F.json --out /tmp/ef --toy              # CPU smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attention_backends.base import DENSE, SELECT, SPARSE
from attention_backends.registry import get_backend_class
from benchmarks.e2e import sdpa_steps
from benchmarks.llada8b import prompt_ids, write_model_dir
from benchmarks.steps import median_of
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.evaluation import ablations
from sparsed_engine.evaluation.drawn import draw_head_densities
from sparsed_engine.evaluation.stats import mcnemar_p, within_points
from sparsed_engine.llm import DEFAULT_MODEL

PAPER = {"skip": 0.2, "select": 0.3, "block_size": 128}
PAPER_PREFIX = "SparseD paper"
TOTAL_STEPS, TARGET = 1024, 2.0
DENSE_STEPS, SPARSE_STEPS = 4, 6    # per timed request: medians of the steps after the first


# ---------------------------------------------------------------- choosing the setting
@dataclass
class Candidate:
    label: str
    backend: str
    config: dict
    cells: dict[int, dict]               # length -> frontier cell
    mean_density: float = float("nan")
    eligible: bool = True                # False: an ablation, listed only
    passed: bool = False
    why: list[str] = field(default_factory=list)


def judge(frontier: dict) -> list[Candidate]:
    """Every non-dense setting of frontier.json with its verdict against dense at every length."""
    if "results" not in frontier or "settings" not in frontier:
        raise ValueError("frontier.json needs 'results' and 'settings' (benchmarks/frontier.py writes both)")
    results = {label: {int(n): c for n, c in row.items()} for label, row in frontier["results"].items()}
    if "dense" not in results or not results["dense"]:
        raise ValueError(f"frontier.json has no dense row to compare with; rows: {sorted(results)}")
    dense = results["dense"]
    lengths = sorted(dense)
    out = []
    for label, cells in results.items():
        if label == "dense":
            continue
        if label not in frontier["settings"]:
            raise ValueError(f"frontier.json: setting {label!r} has results but no entry in 'settings'")
        backend, config = frontier["settings"][label]
        c = Candidate(label, backend, dict(config or {}), cells)
        c.eligible = backend == "sparsed"
        failed = [n for n in lengths if n not in cells]
        if failed:
            c.why.append(f"not measured at {failed} (the frontier run stopped early)")
        for n in lengths:
            if n not in cells:
                continue
            a, b = dense[n]["full_match"], cells[n]["full_match"]
            if len(a) != len(b) or not a:
                c.why.append(f"{n}: {len(b)} samples vs dense's {len(a)}, no paired test")
                failed.append(n)
                continue
            nll = _nll_change(dense[n], cells[n])
            if not any(a):   # nothing for a setting to lose: "within 1 pt" would hold for anything
                c.why.append(f"{n}: vacuous (dense solves 0 of {len(a)} prompts){nll}")
                failed.append(n)
                continue
            drop = 100 * (sum(a) - sum(b)) / len(a)
            verdict = within_points(a, b)
            c.why.append(f"{n}: {verdict} (loses {drop:+.1f} pts, McNemar p={mcnemar_p(a, b):.2g}, "
                         f"{len(a)} prompts){nll}")
            if verdict != "yes":
                failed.append(n)
        c.passed = not failed
        measured = [cells[n]["density"] for n in lengths if n in cells]
        c.mean_density = statistics.fmean(measured) if measured else float("nan")
        if not c.eligible:
            c.why.insert(0, f"ablation ({backend}): listed, not a candidate")
        out.append(c)
    return out


def _nll_change(dense: dict, cell: dict) -> str:
    """', NLL +x.x% vs dense' when both cells carry NLL (context for an override, not a criterion)."""
    if not isinstance(dense.get("nll"), (int, float)) or not isinstance(cell.get("nll"), (int, float)):
        return ""
    return f", NLL {100 * (cell['nll'] / dense['nll'] - 1):+.1f}%"


def choose(cands: list[Candidate], override: str | None = None) -> Candidate | None:
    """The setting to time: `override` by label, else the lowest mean density among the passing
    candidates (ties: the first in frontier order); None when none passes."""
    if override is not None:
        hit = [c for c in cands if c.label == override]
        if not hit:
            raise ValueError(f"--setting {override!r} is not in frontier.json; settings: {[c.label for c in cands]}")
        return hit[0]
    passing = [c for c in cands if c.eligible and c.passed]
    return min(passing, key=lambda c: c.mean_density) if passing else None


def paper_candidate(cands: list[Candidate]) -> Candidate | None:
    return next((c for c in cands if c.label.startswith(PAPER_PREFIX)), None)


def head_table(c: Candidate) -> tuple[int, list[list[float]] | None]:
    """(length, [layers][heads] densities) at the longest length that recorded them; (longest
    length, None) when none did (a frontier.json from before head_density)."""
    with_heads = [n for n, cell in c.cells.items() if cell.get("head_density")]
    if with_heads:
        n = max(with_heads)
        return n, c.cells[n]["head_density"]
    return max(c.cells), None


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return (f"mean {statistics.fmean(values):.3f}, min {min(values):.3f}, quartiles "
            f"{q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}, max {max(values):.3f} ({len(values)} heads)")


def flat(table) -> list[float]:
    return [float(d) for row in table for d in row]


# ---------------------------------------------------------------- timing
def phase_counts(backend: str, config: dict) -> Counter:
    cls = get_backend_class(backend)
    cfg = cls.resolve_config(config)
    return Counter(cls.phase(s, TOTAL_STEPS, cfg) for s in range(TOTAL_STEPS))


def total(counts: Counter, dense: float, select: float, sparse: float) -> float:
    return counts[DENSE] * dense + counts[SELECT] * select + counts[SPARSE] * sparse


def sparse_run(llm: LLM, ids, gen: int, cfg: dict, sync) -> dict:
    """Selection and sparse step times of one request that selects at step 1, and the density of
    the pattern it chose (per layer and head, as the backend recorded it)."""
    backend = llm.llm_engine.executor.worker.backend
    backend.achieved.clear()
    steps = sdpa_steps(llm, ids, SamplingParams(max_tokens=gen, steps=SPARSE_STEPS,
                                                attention_config={**cfg, "skip": 0.0}), "", sync)
    return {"select": median_of(steps, "select", skip_first=False), "sparse": median_of(steps, "sparse"),
            "achieved": [backend.achieved[l].tolist() for l in sorted(backend.achieved)]}


def drawn_config(c: Candidate, table: list[list[float]]) -> dict:
    """The timed request's settings: the candidate's block size and selection scale, the drawn table."""
    keep = {k: c.config[k] for k in ("block_size", "selection_scale", "kernel") if k in c.config}
    return {**keep, "head_density": table}


def measure(llm: LLM, n: int, gen: int, paper: dict, target: dict, sync) -> dict:
    ids = prompt_ids(llm.get_tokenizer(), n - gen)
    dense = SamplingParams(max_tokens=gen, steps=DENSE_STEPS, attention_config={"skip": 1.0})
    if str(llm.llm_engine.device).startswith("cuda"):   # compile both block sizes' kernels at a short length
        for cfg in (paper, target):
            warm_params = SamplingParams(max_tokens=gen, steps=4, attention_config={**cfg, "skip": 0.0})
            sdpa_steps(llm, ids[:min(4096, n // 2)], warm_params, "", sync)
    r = {"dense_cudnn": median_of(sdpa_steps(llm, ids, dense, "cudnn", sync), DENSE),
         "dense_fa2": median_of(sdpa_steps(llm, ids, dense, "flash", sync), DENSE)}
    print(f"dense step: cuDNN {r['dense_cudnn']:.3f} s, FA2 {r['dense_fa2']:.3f} s", flush=True)
    r["paper"] = sparse_run(llm, ids, gen, paper, sync)
    print(f"paper SparseD: selection {r['paper']['select']:.3f} s, sparse {r['paper']['sparse']:.3f} s", flush=True)
    r["drawn"] = sparse_run(llm, ids, gen, target, sync)
    print(f"drawn: selection {r['drawn']['select']:.3f} s, sparse {r['drawn']['sparse']:.3f} s", flush=True)
    return r


# ---------------------------------------------------------------- report
def timing_rows(times: dict, paper: dict, timed: Candidate, label: str) -> list[dict]:
    """The table's rows: the two dense engines, SparseD at the paper's settings with its own
    selection, and the timed setting with drawn densities; 1,024-step totals with each schedule."""
    d_cu = times["dense_cudnn"]
    only_dense = Counter({DENSE: TOTAL_STEPS})
    rows = [{"name": "dense, cuDNN", "short": "dense cuDNN", "counts": only_dense, "dense": d_cu,
             "total": d_cu * TOTAL_STEPS},
            {"name": "dense, FA2", "short": "dense FA2", "counts": only_dense, "dense": times["dense_fa2"],
             "total": times["dense_fa2"] * TOTAL_STEPS}]
    paper_name = f"SparseD paper {json.dumps(paper)}, its own selection"
    for name, short, backend, cfg, run in (
            (paper_name, "SparseD paper", "sparsed", paper, times["paper"]),
            (label, "drawn: " + timed.label[:24], timed.backend, timed.config, times["drawn"])):
        counts = phase_counts(backend, cfg)
        rows.append({"name": name, "short": short, "counts": counts, "dense": d_cu, "select": run["select"],
                     "sparse": run["sparse"], "density": statistics.fmean(flat(run["achieved"])),
                     "total": total(counts, d_cu, run["select"], run["sparse"])})
    for r in rows:
        r["vs_cudnn"], r["vs_fa2"] = rows[0]["total"] / r["total"], rows[1]["total"] / r["total"]
    return rows


def markdown(title: str, cands: list[Candidate], timed: Candidate, at_equal: bool, patterns: str,
             rows: list[dict]) -> str:
    f3 = (lambda x: "-" if x is None else f"{x:.3f}")
    md = [f"### {title}", "", "Candidates (within 1 pt of dense at every length, judged as benchmarks/frontier.py "
          "judges it):", "", "| setting | mean density | status | verdicts |", "|---|---|---|---|"]
    md += [f"| {c.label} | {c.mean_density:.3f} | {status(c)} | {'; '.join(c.why)} |" for c in cands]
    md += ["", f"Timed: **{timed.label}**" + ("" if at_equal else ", NOT at equal fidelity") + ". " + patterns, "",
           "Density of the timed setting by length (frontier): " + ", ".join(
               f"{n}: {cell['density']:.3f}" for n, cell in sorted(timed.cells.items())), "",
           "| run | density at N (achieved) | steps dense/select/sparse | dense step (s) | selection step (s) "
           "| sparse step (s) | 1,024 steps (computed, s) | vs cuDNN-dense | vs FA2-dense |", "|" + "---|" * 9]
    for r in rows:
        c = r["counts"]
        md.append(f"| {r['name']} | {f3(r.get('density'))} | {c[DENSE]}/{c[SELECT]}/{c[SPARSE]} | "
                  f"{r['dense']:.3f} | {f3(r.get('select'))} | {f3(r.get('sparse'))} | {r['total']:.0f} | "
                  f"{r['vs_cudnn']:.2f}x | {r['vs_fa2']:.2f}x |")
    speed = rows[3]["vs_cudnn"]
    verdict = (f"{speed:.2f}x over cuDNN-dense at equal fidelity: the target (>= {TARGET}x) is "
               f"{'met' if speed >= TARGET else 'missed'}" if at_equal else
               f"{speed:.2f}x over cuDNN-dense, but this setting is NOT within 1 point of dense at every "
               f"length: the target ({TARGET}x at equal fidelity) is not reached")
    md += ["", f"**{verdict}.** Dense and sparse steps are medians, the selection step one measured step, all "
           f"through LLMEngine.step (synchronised); the sparse settings' dense steps are cuDNN's; totals computed "
           f"with each setting's own schedule over {TOTAL_STEPS} steps."]
    return "\n".join(md) + "\n"


def describe_patterns(src_len: int, src_table, drawn, achieved, n: int, seed: int) -> str:
    source = (f"per-head densities at {src_len} tokens ({summary(flat(src_table))})" if src_table else
              f"no per-head densities in frontier.json: every head at the mean density at {src_len} tokens")
    return (f"Patterns: {source}, applied at {n} (select fixes the kept share by construction; with mass "
            f"it may change with length: see the densities by length below); drawn onto {len(drawn)} x "
            f"{len(drawn[0])} heads (each measured head copied equally often, shuffled within its layer, in "
            f"depth order; seed {seed}: {summary(flat(drawn))}); "
            f"each head keeps round(density x key blocks) per query block, the diagonal block and then by block "
            f"importance on the random weights' q/k; achieved at {n}: {summary(flat(achieved))}.")


def status(c: Candidate) -> str:
    return "ablation" if not c.eligible else "PASS" if c.passed else "fail"


def plot(data: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = max(flat(data["drawn"]) + flat(data["times"]["drawn"]["achieved"]))
    bins = [top * 1.05 * i / 40 for i in range(41)]
    for values, name in ((flat(data["source"] or []), "measured (fidelity model)"),
                         (flat(data["drawn"]), "drawn (timed model's heads)"),
                         (flat(data["times"]["drawn"]["achieved"]), "achieved at N")):
        if values:
            a.hist(values, bins=bins, density=True, histtype="step", label=name)
    a.set(xlabel="kept-tile density per head", ylabel="share of heads (density)", title="per-head densities")
    a.legend(fontsize=8)
    rows = data["rows"]
    b.bar(range(len(rows)), [r["total"] for r in rows], color=["grey", "silver", "tab:blue", "tab:green"])
    b.set_xticks(range(len(rows)), [r["short"] for r in rows], rotation=10, fontsize=7)
    b.set(ylabel=f"{TOTAL_STEPS} steps (s, computed)", title="1,024-step totals")
    for i, r in enumerate(rows):
        b.annotate(f"{r['vs_cudnn']:.2f}x", (i, r["total"]), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frontier", required=True, help="frontier.json of benchmarks/frontier.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--setting", default=None, help="time this frontier label instead of the chosen one")
    ap.add_argument("--length", type=int, default=None, help="canvas tokens (default 65536; --toy: 512)")
    ap.add_argument("--seed", type=int, default=0, help="of the draw of per-head densities")
    ap.add_argument("--toy", action="store_true", help="CPU smoke: the bundled model's shape, random weights")
    ap.add_argument("--model", default=None, help="model folder whose shape is timed, with random weights "
                    "(default: LLaDA-8B's; --toy: the bundled model's)")
    args = ap.parse_args(argv)
    t0 = time.time()
    n = args.length or (512 if args.toy else 65536)
    gen = 32 if args.toy else 128
    if n <= 2 * gen:
        raise ValueError(f"--length {n} must exceed {2 * gen} (the generation region and a prompt)")
    frontier = json.loads(Path(args.frontier).read_text())
    ablations.register()
    cands = judge(frontier)
    chosen = choose(cands, args.setting)
    paper = paper_candidate(cands)
    print("Candidates (within 1 pt of dense at every length):")
    for c in cands:
        print(f"  [{status(c)}] {c.label}: mean density {c.mean_density:.3f}; " + "; ".join(c.why))
    at_equal = chosen is not None and chosen.passed
    timed = chosen or paper
    if chosen is None:
        print("NO setting is within 1 point of dense at every length: timing the paper setting, "
              "NOT at equal fidelity.")
    if timed is None:
        raise ValueError("nothing passed and frontier.json has no paper setting row "
                         f"(a label starting with {PAPER_PREFIX!r}) to time instead")
    if not args.toy and not torch.cuda.is_available():
        raise ValueError("the timing needs a CUDA device; --toy runs the CPU smoke version")
    paper_cfg = paper.config if paper else PAPER     # the paper setting as the frontier ran it
    print(f"Timing: {timed.label} (mean density {timed.mean_density:.3f}, config {timed.config})")
    src_len, src_table = head_table(timed)
    device = "cpu" if args.toy else "cuda"
    sync = (lambda: None) if device == "cpu" else torch.cuda.synchronize
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(DEFAULT_MODEL if args.toy else write_model_dir(Path(tmp)))
        llm = LLM(model=model, load_format="dummy", dtype="float32" if args.toy else "bfloat16", device=device,
                  attention_backend="sparsed_drawn", attention_config=paper_cfg, max_model_len=n)
        lay = llm.llm_engine.layout
        drawn = draw_head_densities(src_table or [[timed.cells[src_len]["density"]]],
                                    lay.num_layers, lay.num_heads, args.seed)
        times = measure(llm, n, gen, paper_cfg, drawn_config(timed, drawn), sync)
        llm.shutdown()
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (the cuDNN/FA2 pins do not apply)"
    shape = f"{Path(args.model).name} shape" if args.model else "bundled model shape" if args.toy else "LLaDA-8B shape"
    title = (f"Speed at equal fidelity, {shape}, random weights, N={n}, {where}, {datetime.date.today()}, "
             f"torch {torch.__version__}")
    label = f"{timed.label}, drawn densities" + ("" if at_equal else ", NOT at equal fidelity")
    rows = timing_rows(times, paper_cfg, timed, label)
    patterns = describe_patterns(src_len, src_table, drawn, times["drawn"]["achieved"], n, args.seed)
    if chosen is not None and not chosen.passed:
        patterns += " (Chosen by --setting; it did not pass.)"
    md = markdown(title, cands, timed, at_equal, patterns, rows)
    data = {"timed": timed.label, "at_equal_fidelity": at_equal, "rows": rows, "times": times,
            "source_length": src_len, "source": src_table, "drawn": drawn,
            "candidates": [{"label": c.label, "mean_density": c.mean_density, "status": status(c), "why": c.why}
                           for c in cands]}
    print("\n" + md + f"\n(total {time.time() - t0:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "equal_fidelity.md").write_text(md)
    (out / "equal_fidelity.json").write_text(json.dumps(data, indent=1))
    try:
        plot(data, out / "equal_fidelity.png", title)
    except ImportError:
        print("matplotlib is not installed: no equal_fidelity.png")
    return data


if __name__ == "__main__":
    main()
