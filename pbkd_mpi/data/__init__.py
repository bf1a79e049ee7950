"""Data sets: image folders, .npz and HDF5 files, the generated demo, augmentation."""
