"""Making a model cheaper, measured: the figures of the README section "Making a model cheaper".

    python bench/compress.py [--out DIR] [--threads 1]

Trains the default digits CNN and both MNIST-1D CNN presets (experiment=mnist1d_cnn, the paper's
7.7k-parameter setting, and experiment=mnist1d_cnn_tuned), runs `dlrun-compress` on each (structured
pruning at 50% and 75% of the FLOPs with 10 epochs of fine-tuning, static int8 timed eager and under
inductor, dynamic int8, ONNX Runtime; latency at batch 1 and 64), and trains an MNIST-1D student of at
most a quarter of the teacher's parameters (the tuned preset) with and without the teacher, on three
seeds (same seed, same epochs each). Prints the tables and whether each target of
issue 16 is met, and writes them to <out>/compress.md and <out>/compress.json. Every command runs on
`--threads` CPU threads (1 by default: the machine is shared, and more threads measured there are
noise). Timings are medians of dlrun.cost.time_calls blocks: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PRUNE = ["--prune", "0.5,0.75", "--prune-by", "flops", "--finetune-epochs", "10", "--quantize", "static,dynamic",
         "--inductor", "--no-half", "--batch", "64"]
TEACHER = "experiment=mnist1d_cnn_tuned"  # 44,874 parameters
STUDENT = "model.channels=[16,16,16]"  # 3,546 parameters, the same recipe
DISTILL = ["trainer.distill.alpha=0.7", "trainer.distill.temperature=4"]
SEEDS = (0, 1, 2)


def sh(command: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(out: Path, name: str, threads: int, *overrides: str) -> dict:
    folder = out / name
    if not (folder / "summary.json").is_file():
        sh([str(BIN / "dlrun"), *overrides, "device=cpu", f"device.threads={threads}", f"hydra.run.dir={folder}"],
           threads)
    return json.loads((folder / "summary.json").read_text())


def compress(out: Path, name: str, threads: int) -> dict:
    sh([str(BIN / "dlrun-compress"), str(out / name), "--threads", str(threads), *PRUNE], threads)
    return json.loads((out / name / "compress.json").read_text())


def table(result: dict) -> list[str]:
    metric, variants = result["metric"], result["variants"]
    base = variants[0]
    lines = [f"| variant | runtime | {metric} | params | FLOPs/sample | file KiB | batch 1 ms | batch 64 ms | "
             "speed-up at 64 |", "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        b1, b64 = v["latency"]["batch_1"], v["latency"]["batch_64"]
        lines.append(f"| {v['name']} | {v['runtime']} | {v[metric]:.4f} | {v['parameters']:,} | "
                     f"{v['flops_per_sample']:,} | {v['file_mb'] * 1024:.0f} | {b1['median_ms']:.3f} ± {b1['iqr_ms']:.3f} | "
                     f"{b64['median_ms']:.3f} ± {b64['iqr_ms']:.3f} | "
                     f"{base['latency_ms']['batch_64'] / v['latency_ms']['batch_64']:.2f}x |")
    return lines


def targets(result: dict) -> list[str]:
    """Issue 16's targets for one compressed run, met or not, with the figures."""
    metric, by = result["metric"], {v["name"]: v for v in result["variants"]}
    base, lines = by["original"], []
    lat = lambda name: by[name]["latency_ms"]["batch_64"]  # noqa: E731
    for v in result["variants"]:
        if v.get("kind") != "structured":
            continue
        flops, speed, drop = base["flops_per_sample"] / v["flops_per_sample"], lat("original") / lat(v["name"]), \
            (base[metric] - v[metric]) * 100
        met = flops >= 2 and speed >= 1.5 and drop <= 1
        lines.append(f"- {v['name']}: {flops:.2f}x fewer FLOPs, {speed:.2f}x lower latency at batch 64, accuracy "
                     f"{-drop:+.1f} points: target (>=2x, >=1.5x, within 1 point) {'met' if met else 'NOT met'}")
    if "int8-static" in by:
        lines.append(f"- static int8 at batch 64: eager {lat('int8-static'):.3f} ms vs fp32 eager {lat('original'):.3f} ms"
                     f" ({lat('original') / lat('int8-static'):.2f}x)" + (
                         f"; under inductor {lat('int8-static+inductor'):.3f} ms vs fp32 under inductor "
                         f"{lat('original+inductor'):.3f} ms ({lat('original+inductor') / lat('int8-static+inductor'):.2f}x)"
                         if "int8-static+inductor" in by else "")
                     + f"; accuracy {(by['int8-static'][metric] - base[metric]) * 100:+.1f} points")
    if "original+onnxruntime" in by:
        lines.append(f"- ONNX Runtime at batch 64: {lat('original+onnxruntime'):.3f} ms vs PyTorch eager "
                     f"{lat('original'):.3f} ms ({lat('original') / lat('original+onnxruntime'):.2f}x); max abs "
                     f"difference {by['original+onnxruntime']['max_abs_diff']:.1e}")
    lines += [f"- {s['variant']}: skipped: {s['reason']}" for s in result["skipped"]]
    return lines


def distillation(out: Path, threads: int) -> tuple[dict, list[str]]:
    """The tuned MNIST-1D preset as the teacher; a student of the same recipe at a twelfth of its
    parameters, trained with and without the teacher, on each of SEEDS (same seed, same epochs)."""
    teacher = train(out, "mnist1d_tuned", threads, TEACHER)
    rows = []
    for seed in SEEDS:
        plain = train(out, f"student-plain-{seed}", threads, TEACHER, STUDENT, f"trainer.seed={seed}")
        taught = train(out, f"student-distilled-{seed}", threads, TEACHER, STUDENT, f"trainer.seed={seed}",
                       f"trainer.distill.teacher={out / 'mnist1d_tuned'}", *DISTILL)
        rows.append((seed, plain, taught))
    sizes = [s["model"]["parameters"]["total"] for s in (teacher, rows[0][1])]
    gains = [(taught["best"]["test/acc"] - plain["best"]["test/acc"]) * 100 for _, plain, taught in rows]
    plain_mean = statistics.mean(plain["best"]["test/acc"] for _, plain, _ in rows)
    taught_mean = statistics.mean(taught["best"]["test/acc"] for _, _, taught in rows)
    wins = sum(g > 0 for g in gains)
    met = sizes[1] * 4 <= sizes[0] and wins == len(rows)
    lines = ["| model | params | seed | test/acc (best checkpoint) |", "|---|---|---|---|",
             f"| teacher: `{TEACHER}` | {sizes[0]:,} | 0 | {teacher['best']['test/acc']:.4f} |"]
    for seed, plain, taught in rows:
        lines += [f"| student: `{STUDENT}`, labels only | {sizes[1]:,} | {seed} | {plain['best']['test/acc']:.4f} |",
                  f"| student, distilled (`{' '.join(DISTILL)}`) | {sizes[1]:,} | {seed} | "
                  f"{taught['best']['test/acc']:.4f} |"]
    lines += ["", f"- student/teacher parameters {sizes[1] / sizes[0]:.3f}; distilled minus labels only, per seed: "
              + ", ".join(f"{g:+.1f}" for g in gains) + f" points (mean {taught_mean * 100:.2f}% vs "
              f"{plain_mean * 100:.2f}%); the distilled student is better on {wins} of {len(rows)} seeds: target "
              f"{'met' if met else 'NOT met'}"]
    return {"teacher": teacher["best"], "params": sizes,
            "seeds": {seed: {"plain": plain["best"], "distilled": taught["best"]} for seed, plain, taught in rows},
            "gain_points": gains, "met": met}, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="dlrun-bench-compress-"))).resolve()
    started = time.time()
    report = [f"Command: `python bench/compress.py --threads {args.threads}`; {time.strftime('%Y-%m-%d')}; "
              f"{platform.machine()} CPU with {os.cpu_count()} cores (shared), {args.threads} thread(s).", ""]
    results = {}
    for name, overrides in (("digits", []), ("mnist1d", ["experiment=mnist1d_cnn"]), ("mnist1d_tuned", [TEACHER])):
        train(out, name, args.threads, *overrides)
        results[name] = compress(out, name, args.threads)
        report += [f"### {name}: `dlrun {' '.join(overrides) or '(defaults)'}`, then "
                   f"`dlrun-compress <run> --threads {args.threads} {' '.join(PRUNE)}`", "", *table(results[name]), "",
                   *targets(results[name]), ""]
    results["distillation"], lines = distillation(out, args.threads)
    report += ["### Distillation on MNIST-1D (each seed: the same seed and epochs with and without the teacher)", "",
               *lines, ""]
    text = "\n".join(report)
    print(text)
    print(f"({time.time() - started:.0f} s; run folders in {out})")
    (out / "compress.md").write_text(text + "\n")
    (out / "compress.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
