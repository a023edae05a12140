"""Volumes in and out: the reader table, headers and geometry, cases in folders, label maps, previews.

    readers   the formats: which library reads and writes which suffix (`READERS`)
    header    a header and a geometry record, and the checks made before voxels are read
    nifti     NIfTI through nibabel
    sitk      MetaImage, NRRD, DICOM series (and NIfTI) through SimpleITK (the `io` extra)
    volume    a case read into a `Volume`; label maps written in the input's format
    layout    which files of a folder make up a case, and what cases and outputs are called
    preview   PNG pictures of a segmentation and an HTML index
"""
