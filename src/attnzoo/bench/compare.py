"""``attnzoo bench --compare A.json B.json``: what got faster or slower between two runs.

Efficiency rows measured in both runs are matched on (method, backend, pattern, mode, length, device, dtype, shapes);
a change is reported when B's median time (or peak memory) differs from A's by more than ``threshold`` (default 10%).
Quality rows are matched on (method, task, width) and accuracy changes of more than 0.02 are listed. Cases measured in
only one of the runs, or that started or stopped failing, are listed too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnzoo.bench.results import load_results
from attnzoo.bench.tables import md_table


def _key(r: dict[str, Any]) -> tuple:
    return (r["method"], r["backend"], r["pattern"], r["mode"], r["length"], r["device"], r["dtype"], r["batch"],
            r["heads"], r["kv_heads"], r["head_dim"])


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """Changes from run ``a`` to run ``b``: ``faster``, ``slower``, ``memory``, ``status``, ``only_a``, ``only_b``,
    ``quality`` (lists of dicts, largest change first)."""
    rows_a = {_key(r): r for r in a["efficiency"]}
    rows_b = {_key(r): r for r in b["efficiency"]}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                            ("faster", "slower", "memory", "status", "only_a", "only_b", "quality")}
    for key in rows_a.keys() | rows_b.keys():
        ra, rb = rows_a.get(key), rows_b.get(key)
        if ra is None or rb is None:
            out["only_b" if ra is None else "only_a"].append({"case": key})
            continue
        if ra["status"] != rb["status"]:
            out["status"].append({"case": key, "a": ra["status"], "b": rb["status"], "reason": rb.get("reason", "")})
            continue
        if ra["status"] != "ok" or not ra.get("time_median_s") or not rb.get("time_median_s"):
            continue
        ratio = rb["time_median_s"] / ra["time_median_s"]
        if abs(ratio - 1) > threshold:
            out["faster" if ratio < 1 else "slower"].append(
                {"case": key, "a": ra["time_median_s"], "b": rb["time_median_s"], "ratio": ratio})
        ma, mb = ra.get("peak_bytes"), rb.get("peak_bytes")
        if ma and mb and abs(mb / ma - 1) > threshold:
            out["memory"].append({"case": key, "a": ma, "b": mb, "ratio": mb / ma})
    qa = {(r["method"], str(r["task"]), r["dim"]): r for r in a.get("quality", []) if r.get("status") == "ok"}
    for r in b.get("quality", []):
        old = qa.get((r["method"], str(r["task"]), r["dim"]))
        if r.get("status") == "ok" and old is not None and abs(r["accuracy"] - old["accuracy"]) > 0.02:
            out["quality"].append({"case": (r["method"], r["task"]["name"], r["dim"]), "a": old["accuracy"],
                                   "b": r["accuracy"], "ratio": r["accuracy"] - old["accuracy"]})
    for name in ("faster", "slower", "memory"):
        out[name].sort(key=lambda c: abs(c["ratio"] - 1), reverse=True)
    out["quality"].sort(key=lambda c: abs(c["ratio"]), reverse=True)
    return out


def _case(key: tuple) -> str:
    return " ".join(str(x) for x in key[:5])


def render(changes: dict[str, list[dict[str, Any]]], a_name: str, b_name: str) -> str:
    """Markdown for a comparison."""
    lines = [f"# attnzoo bench: {a_name} → {b_name}", ""]
    for name, title, unit in (("faster", "Faster", "ms"), ("slower", "Slower", "ms"), ("memory", "Peak memory", "MiB")):
        scale = 1e3 if unit == "ms" else 1 / 2**20
        body = [[_case(c["case"]), f"{c['a'] * scale:.3g}", f"{c['b'] * scale:.3g}", f"{c['ratio']:.2f}×"]
                for c in changes[name]]
        lines += [f"## {title} ({len(body)})", "", md_table(["case", f"A {unit}", f"B {unit}", "B / A"], body)]
    body = [[_case(c["case"]), c["a"], c["b"], c["reason"]] for c in changes["status"]]
    lines += [f"## Status changed ({len(body)})", "", md_table(["case", "A", "B", "reason in B"], body)]
    body = [[" ".join(map(str, c["case"])), f"{c['a']:.3f}", f"{c['b']:.3f}", f"{c['ratio']:+.3f}"]
            for c in changes["quality"]]
    lines += [f"## Quality changed ({len(body)})", "", md_table(["method task width", "A", "B", "B − A"], body)]
    lines += [f"Cases only in A: {len(changes['only_a'])}; only in B: {len(changes['only_b'])}.", ""]
    return "\n".join(lines)


def main(a_path: str, b_path: str, threshold: float = 0.1) -> str:
    a, b = load_results(a_path), load_results(b_path)
    return render(compare(a, b, threshold), Path(a_path).name, Path(b_path).name)
