"""End to end: `dlrun` versus a plain PyTorch + torchvision script doing the same work.

The work: MNIST-format data (random patterned images written in torchvision's IDX layout,
unless --data-dir has real MNIST), split 55k/5k/10k; an MLP 784-64-128-64-10 with batch
norm; Adam, batch 128, one epoch (on the CPU unless --device cuda); then validation and test accuracy. The plain
script is the usual one: torchvision MNIST with ToTensor + Normalize per sample and a
DataLoader with num_workers=0. Both are timed as whole processes, start-up included, alternating
(--repeats times each); the medians and their min-max are reported.

    python bench/end_to_end.py [--samples 60000] [--epochs 1] [--data-dir DIR] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import DLRUN, paired, report

PLAIN = '''
import sys, torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms
root, epochs, device = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3])
torch.manual_seed(0)
tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
full = datasets.MNIST(root, train=True, transform=tf)
n_val = len(full) // 12
train, val = random_split(full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(0))
test = datasets.MNIST(root, train=False, transform=tf)
def block(i, o): return [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o), nn.ReLU()]
model = nn.Sequential(nn.Flatten(), *block(784, 64), *block(64, 128), *block(128, 64), nn.Linear(64, 10)).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(epochs):
    model.train()
    for x, y in DataLoader(train, batch_size=128, shuffle=True, num_workers=0):
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
model.eval()
with torch.no_grad():
    for split in (val, test):
        correct = sum((model(x.to(device)).argmax(1) == y.to(device)).sum().item()
                      for x, y in DataLoader(split, batch_size=512))
        print(correct / len(split))
'''


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60000, help="training images to write (if writing)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", help="where MNIST/raw/ is or will be written (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    args = parser.parse_args(argv)
    from datafiles import write_mnist

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = Path(args.data_dir or work / "data")
        if not (data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            write_mnist(data_dir, n_train=args.samples, n_test=max(10, args.samples // 6))
        (work / "plain.py").write_text(PLAIN)
        dlrun_cmd = [DLRUN, "dataset=mnist", f"dataset.data_dir={data_dir}", "dataset.val_fraction=0.0833333",
                     "model=mlp", "model.hidden=[64,128,64]", "model.dropout=0", "optimizer=adam",
                     "trainer.batch_size=128", f"trainer.epochs={args.epochs}", f"device={args.device}"]
        times = paired({
            "plain PyTorch + torchvision DataLoader":
                lambda rep: [sys.executable, str(work / "plain.py"), str(data_dir), str(args.epochs), args.device],
            "dlrun (whole command)": lambda rep: [*dlrun_cmd, f"hydra.run.dir={work / f'run{rep}'}"],
        }, work, args.repeats)
    return report("end_to_end", times, "speed-up of dlrun over the plain script",
                  "plain PyTorch + torchvision DataLoader", "dlrun (whole command)",
                  {"samples": args.samples, "epochs": args.epochs, "device": args.device})

if __name__ == "__main__":
    main()
