"""The SAMIRun API, its CRD, and the operator that drives SAMI iterations on Kubernetes."""

__version__ = "0.1.0"
