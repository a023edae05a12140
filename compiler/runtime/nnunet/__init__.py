"""nnU-Net v2's own rules and files, reproduced for engines imported from nnU-Net (no `nnunetv2`).

- `resampling`: its `resample_data_or_seg_to_shape` (splines, anisotropic axes, label voting).
- `files`: its prediction files (`CASE.npz`, `CASE.pkl`, provenance JSON), written.
- `ensemble`: `nnUNetv2_ensemble`'s averaging of prediction folders.
- `postprocessing`: its `postprocessing.pkl` steps (largest connected component).
- `pickles`: its small pickles read through an allow-list, never unpickled freely.
"""
