"""Kubeflow Pipelines v2 components, installed as ``blendsign.components``: one thin wrapper per step over
``blendsign.pipeline`` (see ``stages.py``); ``images.py`` names the container images."""
