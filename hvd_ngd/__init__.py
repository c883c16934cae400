"""hvd_ngd: distributed natural-gradient preconditioning for Horovod jobs."""
