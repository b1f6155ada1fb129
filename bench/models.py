"""The in-process case's model: a small MXNet image classifier with 1000 class scores, built on the spot."""

from __future__ import annotations

from pathlib import Path

INPUT_SHAPE = (1, 3, 32, 32)
CLASSES = 1000


def build_mxnet_classifier(workdir: Path, seed: int = 3) -> tuple[Path, Path]:
    """Export (untrained, seeded) conv -> pool -> conv -> pool -> dense(1000) -> softmax; returns symbol, params."""
    import mxnet as mx
    from mxnet import gluon

    mx.random.seed(seed)
    net = gluon.nn.HybridSequential()
    net.add(
        gluon.nn.Conv2D(16, 3, padding=1, activation="relu"),
        gluon.nn.MaxPool2D(2),
        gluon.nn.Conv2D(32, 3, padding=1, activation="relu"),
        gluon.nn.MaxPool2D(2),
        gluon.nn.Dense(CLASSES),
        gluon.nn.HybridLambda(lambda F, x: F.softmax(x, axis=-1)),
    )
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros(INPUT_SHAPE))
    prefix = workdir / "classifier"
    net.export(str(prefix), epoch=0)
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")


if __name__ == "__main__":  # time one forward pass, to state the model's compute in BENCHMARKS.md
    import sys
    import tempfile
    import timeit

    import mxnet as mx
    import numpy as np

    symbol, params = build_mxnet_classifier(Path(tempfile.mkdtemp()))
    net = mx.gluon.SymbolBlock.imports(str(symbol), ["data"], str(params))
    net.hybridize(static_alloc=True)
    data = np.random.default_rng(0).random(INPUT_SHAPE, dtype=np.float32)
    run = lambda: net(mx.nd.array(data)).asnumpy()  # noqa: E731
    run()
    print(f"forward pass: {timeit.timeit(run, number=200) / 200 * 1e3:.3f} ms", file=sys.stderr)
