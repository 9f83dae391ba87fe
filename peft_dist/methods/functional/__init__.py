"""Autograd Functions for the methods' hot paths (design.md "Layout": ``methods/functional/``).

* :mod:`~peft_dist.methods.functional.kernelized`: SNELL/SNELLA's kernelized sparse delta (snell_snella.md §7.3 A).
* :mod:`~peft_dist.methods.functional.sparse_delta`: SPT's scattered sparse delta (spt_arc_hta.md §1.5).

Nothing is imported here, so each method loads only its own Function (import the submodule you need).
"""
