"""Commands of the compute side, registered into `dicom-node` via entry points."""
