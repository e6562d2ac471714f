"""Multi-stage jobs built from the library: 1-shot RLVR data selection (one_shot), and others."""
