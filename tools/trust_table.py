r"""Markdown tables of the trust figures of evaluation reports (for BENCHMARKS.md).

Reads the ``metrics.json`` written by ``python -m leukemia_tf.evaluate`` (with
or without ``--ood_images``) and prints three tables: out-of-distribution
AUROC / FPR at 95 % TPR per score, selective risk at 90 % coverage against
full coverage, and mistake severity with the back-off.

  python tools/trust_table.py runs/cpu_pbc/eval_test_ood_bccd runs/cpu_mixed_flat/eval_test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCORES = ("max_probability", "margin", "energy", "mahalanobis", "knn_distance")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _load(path: str) -> tuple[str, dict]:
    folder = Path(path)
    metrics = folder / "metrics.json" if folder.is_dir() else folder
    if not metrics.is_file():
        raise SystemExit(
            f"error: {metrics} not found (an evaluation report folder or its metrics.json)"
        )
    data = json.loads(metrics.read_text())
    return f"{metrics.parent.parent.name}/{metrics.parent.name}", data


def ood_rows(reports: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| report | ID | OOD | " + " | ".join(SCORES) + " | referred (OOD / ID) |",
        "|---" * (len(SCORES) + 4) + "|",
    ]
    for name, data in reports:
        ood = data.get("ood")
        if not ood:
            continue
        cells = []
        for score in SCORES:
            row = ood["scores"].get(score, {})
            cells.append(
                f"{_num(row.get('auroc'))} / {_pct(row.get('fpr_at_95_tpr'))}"
                if "auroc" in row
                else "n/a"
            )
        referred = f"{_pct(ood.get('fraction_referred'))} / {_pct(ood.get('id_fraction_referred'))}"
        lines.append(
            f"| {name} | {ood['n_id']} | {ood['n_scored']} | "
            + " | ".join(cells)
            + f" | {referred} |"
        )
    return lines


def selective_rows(reports: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| report | n | error at full coverage | selection score | AURC | error at 90 % coverage "
        "| ratio | fitted referral: referred / error among answered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, data in reports:
        selective = data.get("selective")
        if not selective:
            continue
        referral = selective.get("referral", {})
        score = referral.get("score") or "max_probability"
        summary = selective["scores"].get(score, {})
        at90 = summary.get("at_coverage", {}).get("0.9", {})
        full = summary.get("risk")
        ratio = None if not full or at90.get("risk") is None else at90["risk"] / full
        fitted = (
            f"{_pct(referral.get('fraction_referred'))} / {_pct(referral.get('risk_accepted'))}"
            if referral.get("available")
            else "n/a"
        )
        lines.append(
            f"| {name} | {selective['n']} | {_pct(full)} | {score} | {_num(summary.get('aurc'), 4)} "
            f"| {_pct(at90.get('risk'))} | {_num(ratio, 2)} | {fitted} |"
        )
    return lines


def hierarchy_rows(reports: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| report | errors | mean LCA height of errors | h-distance@1 / @3 | hP / hR / hF1 "
        "| back-off accuracy | mean specificity | abstained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, data in reports:
        hierarchy = data.get("hierarchy")
        if not hierarchy:
            continue
        severity = hierarchy.get("mistake_severity") or {}
        distance = hierarchy.get("hierarchical_distance") or {}
        prf = hierarchy.get("hierarchical_prf") or {}
        backoff = (hierarchy.get("backoff") or {}).get("summary") or {}
        lines.append(
            f"| {name} | {severity.get('n_errors', 'n/a')} | {_num(severity.get('mean_lca_height'))} "
            f"| {_num(distance.get('at_1'))} / {_num(distance.get('at_3'))} "
            f"| {_num(prf.get('precision'))} / {_num(prf.get('recall'))} / {_num(prf.get('f1'))} "
            f"| {_pct(backoff.get('accuracy'))} | {_num(backoff.get('mean_specificity'))} "
            f"| {_pct(backoff.get('abstained_fraction'))} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="evaluation report folders (or metrics.json)")
    args = parser.parse_args(argv)
    reports = [_load(p) for p in args.reports]
    for title, rows in (
        ("Out of distribution: AUROC / FPR at 95 % TPR", ood_rows(reports)),
        ("Selective prediction", selective_rows(reports)),
        ("Mistakes and back-off", hierarchy_rows(reports)),
    ):
        if len(rows) > 2:
            print(f"### {title}\n")
            print("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
