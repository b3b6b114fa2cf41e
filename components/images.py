"""The container images the components run in: the one place that names them.

``BLENDSIGN_IMAGE`` (default ``ghcr.io/blendsign/blendsign:<package version>``, built from
``docker/Dockerfile``: CUDA runtime) runs the GPU stages (train_teacher, distill, evaluate, register);
``BLENDSIGN_CPU_IMAGE`` (default: the same name with ``-cpu`` appended to the tag, built from
``docker/Dockerfile.cpu``) runs the others. Both are read when the pipeline is compiled.
"""

import os

from blendsign import __version__

DEFAULT_IMAGE = f"ghcr.io/blendsign/blendsign:{__version__}"
BASE_IMAGE: str = os.environ.get("BLENDSIGN_IMAGE") or DEFAULT_IMAGE
CPU_IMAGE: str = os.environ.get("BLENDSIGN_CPU_IMAGE") or f"{BASE_IMAGE}-cpu"
