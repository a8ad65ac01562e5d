"""Table S1's report: mean +- std per row, a paired per-seed comparison against the adopted
design, the paper's ordering checked, and a PNG of the six sub-tables (each variant against the
adopted design, ours beside the paper's).

    python benchmarks/table_s1_report.py OUT/table_s1.json      # writes OUT/report.md, .png

Paired comparison: seed s of a variant and seed s of the adopted design share their data order
and initial weights where the architectures agree, so the per-seed differences remove the
seed-to-seed spread the two share. Each difference gets a two-sided paired t-test (with 2 seeds
a small p needs the two differences nearly equal; with 1 seed no test is possible). A sub-table
compares up to five variants with the adopted design, so at p < 0.05 one of them would often
look significant by chance: a difference is called significant when its p-value, adjusted by
Holm's step-down method over the sub-table's tests, is below 0.05. "Ordering reproduced"
compares the order of the variants' mean PQ with the paper's order (Kendall's tau; 1 = the same
order).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

TITLES = {
    "a": "(a) key components", "b": "(b) iterations T", "c": "(c) center update",
    "d": "(d) head dimension", "e": "(e) feature dispatching", "f": "(f) query initialisation",
}
METRICS = ("PQ", "PQ_th", "PQ_st")
# A run "named things" when its PQ_th reaches this. At the cpu budget runs split into two groups,
# stuff at its ceiling in both: things never or barely recognised (PQ_th 0-7.5 in the second
# experiment's 66 three-seed runs) or recognised (9.7-26.6); a mean over seeds mixes the two.
NAMED_PQ_TH = 8.0
LEVEL = 0.05  # "significant": Holm-adjusted p below this


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_test(variant: dict[int, float], adopted: dict[int, float]) -> dict[str, Any]:
    """Paired comparison over the seeds both have: the per-seed differences (variant - adopted,
    in seed order), their mean and standard deviation, the t statistic and the two-sided p-value
    (``None`` when undefined)."""
    seeds = sorted(set(variant) & set(adopted))
    diffs = [variant[s] - adopted[s] for s in seeds]
    if not diffs:
        return {"n": 0, "diffs": [], "diff": None, "diff_std": None, "t": None, "p": None}
    diff, spread = mean_std(diffs)
    if len(diffs) < 2:
        return {"n": 1, "diffs": diffs, "diff": diff, "diff_std": None, "t": None, "p": None}
    if spread == 0.0:
        exact = 1.0 if diff == 0.0 else 0.0  # identical differences: no noise left to test
        return {"n": len(diffs), "diffs": diffs, "diff": diff, "diff_std": 0.0, "t": None,
                "p": exact}
    t = diff / (spread / math.sqrt(len(diffs)))
    return {"n": len(diffs), "diffs": diffs, "diff": diff, "diff_std": spread, "t": t,
            "p": _two_sided_p(t, len(diffs) - 1)}


def _two_sided_p(t: float, dof: int) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), dof))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (``None`` stays ``None`` and is not
    counted): the i-th smallest of m becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``, which
    keeps the chance of any false "significant" in the family at most the level."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def kendall_tau(ours: list[float], paper: list[float]) -> float | None:
    """Kendall's tau-a between two orderings of the same items (``None`` under 2 items)."""
    n = len(ours)
    if n < 2:
        return None
    score = 0
    for i in range(n):
        for j in range(i + 1, n):
            score += _sign(ours[i] - ours[j]) * _sign(paper[i] - paper[j])
    return score / (n * (n - 1) / 2)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def summarise(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per sub-table, per variant (in the table's order): seeds, mean +- std of every metric and
    speed, the paper's numbers, and the paired comparison of PQ against the adopted row."""
    by_variant: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    order: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        key = (row["table"], row["variant"])
        if key not in by_variant:
            order[row["table"]].append(row["variant"])
        by_variant[key].append(row)
    tables: dict[str, list[dict[str, Any]]] = {}
    for table, variants in order.items():
        adopted = next((by_variant[(table, v)] for v in variants
                        if by_variant[(table, v)][0].get("adopted")), [])
        adopted_pq = {r["seed"]: r["PQ"] for r in adopted}
        lines = [_line(by_variant[(table, v)], adopted_pq) for v in variants]
        tests = [line["vs_adopted"] for line in lines if line["vs_adopted"] is not None]
        for test, p_holm in zip(tests, holm([t["p"] for t in tests]), strict=True):
            test["p_holm"] = p_holm
        tables[table] = lines
    return tables


def _line(runs: list[dict[str, Any]], adopted_pq: dict[int, float]) -> dict[str, Any]:
    first = runs[0]
    line: dict[str, Any] = {"variant": first["variant"], "adopted": bool(first.get("adopted")),
                            "seeds": len(runs), "key": first.get("key")}
    for metric in (*METRICS, "SQ", "RQ", "train_img_per_s", "peak_rss_mib"):
        values = [r[metric] for r in runs if r.get(metric) is not None]
        line[metric] = mean_std(values) if values else None
    # Each seed's PQ and PQ_th: a mean hides a seed whose things were never named (PQ_th near
    # 0 beside stuff at its ceiling), which is most of the spread at the cpu budget's scale.
    line["per_seed"] = [(r["seed"], r["PQ"], r["PQ_th"]) for r in sorted(runs, key=lambda r: r["seed"])]
    line["named"] = sum(r["PQ_th"] >= NAMED_PQ_TH for r in runs)
    line["paper"] = tuple(first.get(f"paper_{m}") for m in METRICS)
    line["vs_adopted"] = None if line["adopted"] else paired_test(
        {r["seed"]: r["PQ"] for r in runs}, adopted_pq)
    return line


def speed_ratio(rows: list[dict[str, Any]], table: str, variant: str) -> float | None:
    """Median over seeds of (adopted img/s / ``variant`` img/s): how many times slower the
    adopted design trains (S1b: T = 3 against T = 1; the paper measured 3.8 % slower)."""
    def speeds(pick) -> dict[int, float]:
        return {r["seed"]: r["train_img_per_s"] for r in rows
                if r["table"] == table and pick(r) and r.get("train_img_per_s")}
    adopted = speeds(lambda r: r.get("adopted"))
    other = speeds(lambda r: r["variant"] == variant)
    ratios = [other[s] / adopted[s] for s in sorted(set(adopted) & set(other))]
    return statistics.median(ratios) if ratios else None


def significant(test: dict[str, Any] | None) -> bool:
    """Whether a :func:`paired_test` (after :func:`summarise`'s Holm adjustment) is below
    ``LEVEL``; ``False`` for no test."""
    if test is None or test["p"] is None:
        return False
    return test.get("p_holm", test["p"]) < LEVEL


def _fmt(pair: tuple[float, float] | None, digits: int = 1) -> str:
    return "-" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _verdict(test: dict[str, Any] | None) -> str:
    if test is None:
        return "adopted"
    if test["diff"] is None:
        return "no paired seeds"
    text = f"{test['diff']:+.2f}"
    if test["p"] is None:
        return f"{text} (1 seed: no test)"
    p_holm = test.get("p_holm", test["p"])
    return (f"{text}, p = {test['p']:.2g} (Holm {p_holm:.2g}): "
            + ("significant" if significant(test) else "within noise"))


def markdown(tables: dict[str, list[dict[str, Any]]],
             cost: dict[str, float] | None = None) -> str:  # fmt: skip
    """The report's Markdown: one table per sub-table, ours beside the paper's. ``cost``: run
    key -> step time x the adopted design's, timed side by side (``table_s1_cost.py``)."""
    cost = cost or {}
    out = []
    for table, lines in sorted(tables.items()):
        out += [f"### {TITLES[table]}", "",
                "| variant | seeds | PQ (PQ_th) per seed | PQ | PQ_th | PQ_st | paper PQ / th / st "
                "| named things | vs adopted (PQ) | step time x adopted | train img/s | peak RSS MiB |",
                "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for line in lines:
            paper = " / ".join("-" if v is None else f"{v:.1f}" for v in line["paper"])
            name = f"**{line['variant']}**" if line["adopted"] else line["variant"]
            ratio = cost.get(line.get("key") or "")
            per_seed = " / ".join(f"{pq:.1f} ({th:.1f})" for _, pq, th in line["per_seed"])
            out.append(f"| {name} | {line['seeds']} | {per_seed} | {_fmt(line['PQ'])} "
                       f"| {_fmt(line['PQ_th'])} "
                       f"| {_fmt(line['PQ_st'])} | {paper} | {line['named']}/{line['seeds']} "
                       f"| {_verdict(line['vs_adopted'])} "
                       f"| {'-' if ratio is None else f'{ratio:.3f}'} "
                       f"| {_fmt(line['train_img_per_s'])} | {_fmt(line['peak_rss_mib'], 0)} |")
        tau = kendall_tau([line["PQ"][0] for line in lines if line["PQ"]],
                          [line["paper"][0] for line in lines if line["PQ"]])
        out += ["", "Ordering of mean PQ against the paper's: "
                + ("-" if tau is None else f"Kendall tau {tau:+.2f}"
                   + (" (reproduced)" if tau == 1.0 else " (not reproduced)")), ""]
    return "\n".join(out)


def paired_differences(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant of one sub-table (the adopted row left out): its PQ minus the adopted design's,
    seed by seed (the paired test's differences), their mean, and the paper's difference; the
    plot's data."""
    adopted = next((line for line in lines if line["adopted"]), None)
    if adopted is None:
        return []
    paper_base = adopted["paper"][0]
    out = []
    for line in lines:
        if line["adopted"]:
            continue
        test, paper = line["vs_adopted"], line["paper"][0]
        out.append({"variant": line["variant"], "diffs": test["diffs"], "mean": test["diff"],
                    "paper": None if paper is None or paper_base is None else paper - paper_base,
                    "significant": significant(test)})
    return out


def plot(tables: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Six panels, one per sub-table: each variant's PQ minus the adopted design's, ours (bar: the
    mean of the per-seed differences; crosses: each seed) beside the paper's (dot), in PQ points
    on one axis shared by all panels. Differences, not absolute PQ: ours (synthetic scenes) and
    the paper's (COCO) sit at different levels, but both say how far a variant is from the
    adopted design, and in which direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharey=True, constrained_layout=True)
    for ax, table in zip(axes.flat, "abcdef", strict=True):
        ax.set_title(TITLES[table])
        rows = paired_differences(tables.get(table, []))
        if not rows:
            ax.set_axis_off()
            continue
        xs = list(range(len(rows)))
        ax.axhline(0.0, color="tab:red", linewidth=1.2,
                   label="adopted design (0)" if table == "a" else None)
        ax.bar(xs, [0.0 if r["mean"] is None else r["mean"] for r in rows], width=0.6,
               color=["tab:orange" if r["significant"] else "tab:blue" for r in rows], alpha=0.75,
               label="ours: mean of paired seeds" if table == "a" else None)
        # Each seed's difference: at this scale a row's seeds can split into two groups (things
        # named or not), which a mean hides.
        for x, r in zip(xs, rows, strict=True):
            ax.plot([x] * len(r["diffs"]), r["diffs"], "x", color="0.15", markersize=6,
                    label="ours: each seed" if table == "a" and x == 0 else None)
        paper = [(x, r["paper"]) for x, r in zip(xs, rows, strict=True) if r["paper"] is not None]
        ax.plot([x for x, _ in paper], [d for _, d in paper], "o", color="black", markersize=7,
                markerfacecolor="white", markeredgewidth=1.8,
                label="paper (COCO)" if table == "a" else None)
        ax.set_xticks(xs, [r["variant"] + (" *" if r["significant"] else "") for r in rows],
                      rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("PQ - adopted design's PQ")
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Table S1: each variant against the adopted design "
                 "(* and orange: significant after Holm within the sub-table)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_costs(path: Path) -> dict[str, float]:
    """Run key -> step time x the adopted design's, from ``table_s1_cost.py``'s JSON ({} when
    it has not been run)."""
    if not path.exists():
        return {}
    return {row["key"]: row["time_x_adopted"] for row in json.loads(path.read_text())["rows"]}


def write_report(table_json: Path, out: Path) -> Path:
    """``OUT/report.md`` and ``OUT/table_s1.png`` from ``table_s1.json``; returns the report."""
    data = json.loads(Path(table_json).read_text())
    tables = summarise(data["rows"])
    report = out / "report.md"
    header = (f"Table S1, budget {data.get('budget')}, {data.get('seeds')} seed(s) per row planned "
              f"(\"seeds\": how many have finished; PQ mean ± std over them; bold = the adopted "
              f"design).\n\n")
    costs = read_costs(out / "cost.json")
    notes = []
    ratio = speed_ratio(data["rows"], "b", "T=1")
    if ratio is not None:
        notes.append(f"Training time of T = 3 against T = 1 (median per-seed img/s ratio of the "
                     f"runs, which shared the machine): x{ratio:.3f} ({(ratio - 1) * 100:+.1f} %; "
                     "the paper: about +3.8 %).")
    t1 = next((r.get("key") for r in data["rows"] if r["table"] == "b" and r["variant"] == "T=1"),
              None)
    if costs and t1 in costs:
        step = 1 / costs[t1]
        notes.append(f"Training step of T = 3 against T = 1, timed side by side "
                     f"(`table_s1_cost.py`): x{step:.3f} ({(step - 1) * 100:+.1f} %).")
    notes.append(f"\"named things\": the seeds whose PQ_th reached {NAMED_PQ_TH:g} (the rest "
                 "left things unrecognised; PQ_st is near its ceiling in both).")
    if costs:
        notes.append("\"step time x adopted\": each configuration's training step time over "
                     "the adopted design's, median of interleaved rounds in one process "
                     "(`OUT/cost.json`); \"train img/s\" is what each run logged, beside "
                     "whatever else ran.")
    report.write_text(header + markdown(tables, costs) + "\n" + "\n".join(notes) + "\n")
    plot(tables, out / "table_s1.png")
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: table_s1_report.py OUT/table_s1.json")
    target = Path(sys.argv[1])
    print(write_report(target, target.parent))
