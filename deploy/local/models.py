"""Models for the local stack: the demo's MXNet classifier (legacy) and its TorchScript port laid out
as a Triton model repository, the same layout as deploy/triton/model_repository.

    python deploy/local/models.py STACK_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from server.demo.mxnet_models import IMAGE_SHAPE, NUM_CLASSES, build_demo_models

CONFIG_PBTXT = """name: "classifier_torch"
platform: "pytorch_libtorch"
max_batch_size: 16
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def main(stack_dir: Path) -> int:
    models = build_demo_models(stack_dir / "models")
    version = stack_dir / "model_repository" / "classifier_torch" / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(models.faithful_torch, version / "model.pt")
    (version.parent / "config.pbtxt").write_text(
        CONFIG_PBTXT.format(dims=", ".join(map(str, IMAGE_SHAPE)), classes=NUM_CLASSES))
    print(f"legacy MXNet files in {stack_dir / 'models'}, Triton model repository in {version.parent.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
