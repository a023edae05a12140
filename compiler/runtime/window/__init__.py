"""The sliding window: nnU-Net v2's grid, blending and accumulation over any predictor.

Import from the modules (this package's import stays light: the CLI reads `selection.SKIP_MODES`
and `blending.BLENDING_MODES` for its choices):

    config      the predictor contract and the settings of one walk (`SlidingWindowConfig`)
    grid        where the windows are; the walk's axis order
    plan        the decisions of one walk, made once (`plan_window`)
    blending    the tile weight (nnU-Net's Gaussian, or constant)
    selection   which windows to evaluate (`SKIP_MODES`) and the walk's `WindowReport`
    accumulator weighted logit sums over one slab
    walk        the walk itself (`stream_logits`, `sliding_window_inference`)
"""
