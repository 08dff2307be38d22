"""Wall time of a nightly matrix: 4 small models trained here on digits x the 3 built-in targets
(12 cells, each a full `toolchain build` with the target's own settings and 3 latency
measurements), run with 1 and with 2 local workers into one history. Run alone:
`python benchmarks/matrix_workers.py` (a few minutes on 2 cores).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain.inputs.examples import digits_cnn  # noqa: E402
from toolchain.measure.cpu import host_cpu  # noqa: E402

MODELS = {
    "cnn": lambda nn: digits_cnn(),  # the example model
    "mlp": lambda nn: nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    ),
    "depthwise": lambda nn: nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.Hardswish(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.BatchNorm2d(32),
        nn.Hardswish(),
        nn.Conv2d(32, 64, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ),
    "wide": lambda nn: nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 16, 10),
    ),
}


def write_models(folder: Path) -> str:
    import torch
    from torch import nn

    from toolchain.inputs.examples import digits_data, train

    x_train, x_test, y_train, y_test = digits_data()
    np.savez(folder / "calib.npz", x=x_train[:256])
    np.savez(folder / "val.npz", x=x_test, y=y_test)
    tables = []
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = train(make(nn), x_train, y_train, epochs=8)
        ep = torch.export.export(
            model,
            (torch.from_numpy(x_train[:2]),),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        )
        torch.export.save(ep, str(folder / f"{name}.pt2"))
        tables.append(f'[models.{name}]\nmodel = "{name}.pt2"\ncalib = "calib.npz"\nval = "val.npz"\n')
    return "\n".join(tables)


def main() -> None:
    from toolchain.matrix.history import History
    from toolchain.matrix.run import run_matrix
    from toolchain.matrix.spec import load_matrix

    print(f"host: {host_cpu()['model']}, 2 cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = write_models(root)
        (root / "matrix.toml").write_text(
            '[matrix]\nname = "bench"\ntargets = ["x86_fbgemm", "qualcomm_snapdragon", "nvidia_xavier"]\n'
            f'out = "build"\n\n{models}'
        )
        matrix = load_matrix(root / "matrix.toml")
        history = History(matrix.db_url)
        rows = []
        for workers in (1, 2):
            start = time.perf_counter()
            done = run_matrix(matrix, history, workers=workers)
            wall = time.perf_counter() - start
            cells = history.cells_of([done.run.id])
            statuses = [c["status"] for c in cells]
            rows.append(
                (
                    workers,
                    wall,
                    sum(c["seconds"] for c in cells),
                    statuses.count("passed"),
                    len(cells),
                    len(done.alarms),
                )
            )
        print("| workers | wall s | sum of cell s | passed | alarms |\n|---|---|---|---|---|")
        for workers, wall, cell_s, passed, total, alarms in rows:
            print(f"| {workers} | {wall:.0f} | {cell_s:.0f} | {passed}/{total} | {alarms} |")
        print(f"2 workers / 1 worker wall time: {rows[1][1] / rows[0][1]:.2f}x")
        history.close()


if __name__ == "__main__":
    main()
