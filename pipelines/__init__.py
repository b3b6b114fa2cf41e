"""The Kubeflow pipeline, installed as ``blendsign.pipelines``: the wiring (``blendsign_pipeline.py``), cluster
profiles (``profile.py``), backend variants (``backends.py``) and the client side (``launch.py``)."""
