"""ViTs that learn from small data (issue 9).

* :mod:`~vitkit.smalldata.gmm`: Gaussian-mixture mask attention (a model transform, ``gmm``);
* :mod:`~vitkit.smalldata.dhvt`: the DHVT family (timm-registered ``vitkit_dhvt_*`` models);
* :mod:`~vitkit.smalldata.ewa`: experts weights averaging (a transform + objective wrapper, ``ewa``);
* :mod:`~vitkit.smalldata.stem`: a CI2P-style compressed convolutional patch stem (``stem``);
* :mod:`~vitkit.smalldata.rank`: As-ViT's training-free complexity proxy and configuration ranking.

Nothing is imported here: ``vitkit.models`` imports :mod:`~vitkit.smalldata.dhvt` to register the
DHVT models, and that must not pull in the modules that import ``vitkit.models`` back.
"""
