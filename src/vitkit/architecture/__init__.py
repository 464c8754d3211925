"""Architecture: transforms that change what a ViT computes so that it learns from small data
(issue 9): attention masks, a patch stem, a mixture-of-experts FFN for training.

* :mod:`~vitkit.architecture.gmm`: Gaussian-mixture mask attention (a model transform, ``gmm``);
* :mod:`~vitkit.architecture.stem`: a CI2P-style compressed convolutional patch stem (``stem``);
* :mod:`~vitkit.architecture.ewa`: experts weights averaging (a transform applied for training,
  averaged after every update, merged back into a plain ViT: ``ewa`` / ``ewa_merge``).

Each is a model transform recorded in the manifest (see ``vitkit.registry``); import the submodule
you need, e.g. ``from vitkit.architecture.gmm import apply_gmm``. The DHVT model family is in
:mod:`vitkit.models.dhvt`, As-ViT's configuration ranking in :mod:`vitkit.analyze.rank`.
"""
