"""`make bench`: run every benchmark, keep their JSON lines in results/bench.json and regenerate the
README's Performance table and the measured tables of "Making a model cheaper" (bench/compress.py)
from them (nothing in them is typed by hand).

    python bench/run_all.py                      # all, with the thread count each bench states
    python bench/run_all.py --only threads sweep # some; the others are kept from results/bench.json
    python bench/run_all.py --render             # only rewrite the README from results/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "bench.json"
sys.path.insert(0, str(ROOT / "scripts"))
from results import README, machine_line, write_readme  # noqa: E402  (scripts/results.py)

# name -> (the command's arguments, its environment, what it compares)
BENCHES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "loop_overhead": ([], {"OMP_NUM_THREADS": "1"},
                      "samples/s of dlrun's training epoch (its defaults) vs a careful plain PyTorch loop, naive "
                      "(NCHW, unfused Adam) and with dlrun's fast paths (channels-last CNN, fused Adam); same model "
                      "(CNN: the Keras MNIST example, 34,826 parameters; RNN: LSTM 128 over rows; MLP 64-128-64), "
                      "data in memory, batch 128, 1 thread"),
    "end_to_end": ([], {"OMP_NUM_THREADS": "1"},
                   "the whole `dlrun` command (start-up, MNIST-format files, 55k/5k/10k, MLP 784-64-128-64-10 with "
                   "batch norm, Adam, batch 128, one epoch, val and test) vs the same work as a plain torchvision "
                   "script (`ToTensor` + `Normalize` per sample, `DataLoader`, `num_workers=0`), 1 thread"),
    "startup": ([], {}, "`dlrun --help` / `dlrun --cfg job` vs `python -c \"import torch\"`"),
    "data_pipeline": ([], {}, "one epoch of shuffled, normalised MNIST batches: dlrun's in-memory loader vs "
                              "torchvision `MNIST` + `ToTensor` + `DataLoader`, 1 thread"),
    "sweep": ([], {}, "4 jobs of a 20-epoch digits CNN: one after another vs `launcher=local_parallel` (one process "
                      "per core, one thread per job)"),
    "ddp_overhead": ([], {}, "samples/s of dlrun's `fit` on 2 gloo processes vs a plain PyTorch DDP loop in the same "
                             "processes (global batch 128)"),
    "post_training": ([], {}, "seconds after the last training step (test evaluation and analysis, cost, plots) as a "
                              "share of training time: the default run, and one epoch of the default CNN on 60k "
                              "MNIST-format images (also with the earlier evaluation batch of 512), 1 thread"),
    "threads": ([], {}, "a training step with 2 threads: OpenMP's default wait policy vs PASSIVE (what dlrun sets on "
                        "a machine busy at start), idle and with one busy process per core that the bench starts"),
}


def run_compress() -> tuple[dict, str]:
    """bench/compress.py: its results and its Markdown (the README's "Measured" tables)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compress.py"), "--out", tmp, "--threads", "1"],
                              capture_output=True, text=True, cwd=ROOT)
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench compress failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "compress.json").read_text()), (Path(tmp) / "compress.md").read_text()


def run(name: str) -> dict:
    args, env, _ = BENCHES[name]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figure(name: str, r: dict) -> str:
    """The README's ratio cell for one bench's JSON line."""
    if name == "loop_overhead":
        return "; ".join(f"{m['model'].upper()} {m['vs_naive']:.2f}x the naive loop, {m['vs_fast']:.2f}x the fast one"
                         for m in r["results"])
    if name == "ddp_overhead":
        return ", ".join(f"{m['model'].upper()} {m['ratio']:.2f}" for m in r["results"])
    if name == "threads":
        return (f"under load PASSIVE is {r['busy: 2 threads default / PASSIVE (collapse avoided)']:.1f}x faster; "
                f"idle it would take {r['idle: 2 threads PASSIVE / default (cost when idle)']:.2f}x the default's "
                "time, so dlrun keeps the default there (MLP step, medians over 3 repetitions)")
    if name == "post_training":
        return "; ".join(f"{k}: {100 * v['share']:.1f}% ({v['after_training_s']:.2f} s after {v['train_s']:.1f} s)"
                         for k, v in r.items() if isinstance(v, dict))
    if name == "startup":
        torch_s = r['python -c "import torch"']
        return (f"{r['ratio']:.1f}x / {r['cfg_ratio']:.1f}x faster ({r['dlrun --help']:.2f} s, {r['dlrun --cfg job']:.2f} s "
                f"vs {torch_s:.2f} s)")
    if name == "data_pipeline":
        return f"{r['ratio']:.0f}x ({r['dlrun_samples_per_s']:,.0f} vs {r['torchvision_samples_per_s']:,.0f} samples/s)"
    sides = [k for k in r if isinstance(r[k], float) and f"{k} range" in r]
    times = " vs ".join(f"{r[k]:.1f} s" for k in sides)
    return f"{r['ratio']:.2f}x ({times}, medians of {r['repeats']} alternating runs)"


def render(results: dict) -> str:
    lines = [f"Made by `make bench` ({machine_line(results['machine'])}); each figure is a ratio measured in one "
             "run, both sides alternating, so only ratios compare across machines.", "",
             "| benchmark | what is compared | ratio |", "| --- | --- | --- |"]
    for name, (_, _, what) in BENCHES.items():
        if name in results["benches"]:
            lines.append(f"| `bench/{name}.py` | {what} | {figure(name, results['benches'][name])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[*BENCHES, "compress"])
    parser.add_argument("--render", action="store_true", help="only rewrite the README from results/bench.json")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benches": {}}
    if not args.render:
        from results import machine

        results["machine"] = {**machine(), "date": datetime.date.today().isoformat()}
        for name in args.only or [*BENCHES, "compress"]:
            print(f"== bench/{name}.py", flush=True)
            if name == "compress":  # its own tables, for the README section "Making a model cheaper"
                results["compress"], results["compress_md"] = run_compress()
            else:
                results["benches"][name] = run(name)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    blocks = {"bench": render(results)}
    if "compress_md" in results:
        blocks["compress"] = results["compress_md"].strip()
    README.write_text(write_readme(blocks, README.read_text()))
    print(f"wrote {RESULTS.relative_to(ROOT)} and README.md's Performance table")


if __name__ == "__main__":
    main()
