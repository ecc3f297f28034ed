"""Lennard-Jones, 51,200 atoms (N = 307,200, d = 32): the large system (experiments.md section 5).

The paper names this system but released no code or numbers beyond one
autoencoder command (307,200 inputs, ONE hidden layer, lambda_cond 1e-3,
batch 32). Our protocol is the Fig. 4 one at the next size: 50 NVE runs of
250 steps at density 0.8 (box 40), 45 for the pool and 5 for the test set;
OnsagerNet ensembles of 10; L_x,p with 50 atoms per configuration against
L_z at the same force budget (512,000 atom forces: 10,240 configurations x
50 atoms, or 10 configurations x 51,200 atoms).

  python experiments/train.py --config configs/lj51200.py --workdir workdirs/lj51200 \
      --out docs/results/lj51200.json
writes workdirs/lj51200/stages.json (wall seconds and peak memory of every
stage). Every stage resumes when started again: the pool is written in blocks
of 5 runs (13.8 GB in float32, read memory-mapped; a second process started
with --data_only shares the generation), the autoencoder checkpoints every
epoch, the ensembles every 50 epochs.

Differences from the smaller sizes: runs are simulated in blocks (forced by
size), and each block starts from its own configuration, inserted and
minimised by jax-md's FIRE (one configuration for all runs of a block), not
from the reference's LAMMPS state as at the smaller sizes;
the autoencoder has one hidden layer (the reference's comment "only 1
layer").

Variants (config argument after the colon):
  :smoke  100 atoms in blocks, seconds; used by the test suite.
"""

from configs import lj_scaling

N_ATOMS = 51_200
BOX = 40.0  # density 0.8
K = 50  # atoms with forces per L_x,p configuration


def get_config(variant: str = ""):
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown lj51200 config variant {variant!r}; use '' or 'smoke'")
    smoke = variant == "smoke"
    c = lj_scaling.get_config("smoke" if smoke else "21600")  # the Fig. 4 protocol
    n, k = (100, 10) if smoke else (N_ATOMS, K)
    c.system.params.n_atoms = n
    c.system.params.box_size = 5.0 if smoke else BOX
    # A run of 51,200 atoms stores 250 frames x 307,200 values in float32 (0.3 GB)
    # plus its float64 labels while it is simulated: two runs per MD batch.
    c.system.params.md_batch_size = 2
    # Our jax-md start (insertion + FIRE), one per block: the pool was generated so
    # before the reference's LAMMPS start became the default of the smaller sizes.
    c.system.params.initial = "fire"
    c.data.one_ensemble = False
    c.data.block_trajectories = 2 if smoke else 5
    if not smoke:
        c.data.n_pool_trajectories = 45
        c.data.n_test_trajectories = 5

    # 307,200 -> 64 -> 31 (+ temperature): one hidden layer, as the reference's command.
    c.autoencoder.hidden = (16,) if smoke else (64,)
    c.autoencoder.checkpoint_every = 1

    c.train.runs = ("z", f"xp:{k}/{n}")
    # L_z: 10 configurations x 51,200 atoms; L_x,p: 10,240 configurations x 50 atoms.
    c.train.budget = 2_000 if smoke else 10 * N_ATOMS
    c.train.draw_configs = "random"  # spread the configurations over the blocks' runs
    c.train.precompute_chunk = 64 if smoke else 32  # 32 configurations = 39 MB of input per chunk
    c.sweep.runs = c.train.runs
    return c
