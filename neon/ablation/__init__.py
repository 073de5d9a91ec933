"""The ablation command (tools/ablate.py): train named variants of one base config over a
learning-rate grid with the real pretrain_neon.py, then compare them at their best rates.

    variants.py  base config with every feature off + each variant's overlay -> one YAML per variant
    grid.py      the learning-rate grid rule (3 rates 3x apart, extended at an edge, every seed)
    runs.py      one (variant, lr, seed) run: its directory, its state, launching it locally
    slurm.py     the same runs as a Slurm job array through examples/slurm/pretrain_dense.sbatch
    datastore.py the training split's datastore that an overlay names as ${NEON_TRAIN_DATASTORE}
    report.py    the table (markdown + JSON) and the plot
    cli.py       the command line and the round-by-round loop
"""
