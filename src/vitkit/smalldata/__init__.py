"""ViTs that learn from small data (issue 9).

* :mod:`~vitkit.smalldata.gmm`: Gaussian-mixture mask attention (a model transform, ``gmm``);
* :mod:`~vitkit.smalldata.ewa`: experts weights averaging (a transform + objective wrapper, ``ewa``);
* :mod:`~vitkit.smalldata.stem`: a CI2P-style compressed convolutional patch stem (``stem``);
* :mod:`~vitkit.smalldata.rank`: As-ViT's training-free complexity proxy and configuration ranking.

The DHVT model family lives in :mod:`vitkit.models.dhvt`.
"""
