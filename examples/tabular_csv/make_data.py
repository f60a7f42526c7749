"""Write each site's CSV files: scikit-learn's breast-cancer table, split between the sites.

    python make_data.py --sites 3 --out data

gives data/site1/train.csv, data/site1/test.csv, ... (a header row, 30 feature columns, ``label``).
In a real federation each site already has its own files; this only makes some to try the example.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def write_sites(out: Path, sites: int, seed: int = 0) -> list[Path]:
    """Shuffle the table, give each site an equal part, 80% of it to train; the site directories."""
    table = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(table.target))
    header = [name.replace(" ", "_") for name in table.feature_names] + ["label"]
    dirs = []
    for i, part in enumerate(np.array_split(order, sites), 1):
        site = out / f"site{i}"
        site.mkdir(parents=True, exist_ok=True)
        cut = int(len(part) * 0.8)
        for name, rows in (("train.csv", part[:cut]), ("test.csv", part[cut:])):
            with open(site / name, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(header)
                for r in rows:
                    writer.writerow([*table.data[r], int(table.target[r])])
        dirs.append(site)
    return dirs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args()
    for path in write_sites(args.out, args.sites):
        print(path)
