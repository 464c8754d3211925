"""ViTs that learn from small data (issue 9): what is left here moves next.

* :mod:`~vitkit.smalldata.rank`: As-ViT's training-free complexity proxy and configuration ranking.

The DHVT model family lives in :mod:`vitkit.models.dhvt`; GMM masks, the patch stem and EWA in
:mod:`vitkit.architecture`.
"""
