"""Stages: one module per verb, each a function from run directories (and options) to a new run
directory or a report. A stage reads its run once (:class:`vitkit.runs.Run`), calls the techniques,
and writes its outputs; techniques never import a stage. The CLI, the pipeline and :mod:`vitkit.api`
call these functions.

    train      vitkit train                  evaluate   vitkit evaluate
    distill    vitkit distill, evaluate-heads
    pretrain   vitkit pretrain (MAE, ExPLoRA) finetune   vitkit finetune
    quantize   vitkit quantize               compress   vitkit reduce-tokens, prune, reparam
    compare    vitkit compare                export     vitkit export
    bench      vitkit bench                  report     vitkit report
    analyze    vitkit attack, perturb, similarity, attention, artifacts, mil
"""
