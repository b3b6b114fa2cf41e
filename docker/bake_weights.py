"""Download torchvision's ImageNet weights of the given backbones into the torch hub cache, at image build time.

Usage: ``python docker/bake_weights.py resnet50 resnet18 ...`` (``$TORCH_HOME`` decides where they go:
``$TORCH_HOME/hub/checkpoints/<file>``, exactly where ``blendsign.model.weights_file`` looks at run time).
"""

import sys

import torch

from blendsign.model import IMAGENET_WEIGHTS, weights_file


def main(backbones: list[str]) -> int:
    for backbone in backbones or list(IMAGENET_WEIGHTS):
        target = weights_file(backbone)  # refuses unknown backbones
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.load_state_dict_from_url(IMAGENET_WEIGHTS[backbone].url, model_dir=str(target.parent),
                                           file_name=target.name, progress=False, check_hash=True)
        print(f"{backbone}: {target} ({target.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
