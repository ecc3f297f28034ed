"""Allen-Cahn 2-D phase field (N = 40,000, d = 16): the paper's protocol (experiments.md section 2).

L_z on 2,500 configurations with all forces vs L_x,p on 40,000 configurations
with 2,500 grid points each (p = 1/16): 1e8 force computations each; OnsagerNet,
3 seeds, error of the free energy against the 50 true test trajectories.

  python experiments/train.py --config configs/allen_cahn.py --workdir workdirs/allen_cahn

Error vs force budget (3e6 ... 1e8 for both losses, same workdir: the 1e8
runs of the command above are reused, not retrained):
  python experiments/sweep.py --config configs/allen_cahn.py --workdir workdirs/allen_cahn \
      --out docs/results/allen_cahn_budgets.json

The pool (400 trajectories x 400 frames, ~9 GB after the energy filter) is
written block by block to workdir/data/pool/ and read memory-mapped; an
interrupted generation or training run resumes when started again.
Variants (config argument after the colon):
  :smoke       a 16 x 16 grid, seconds; used by the test suite.
  :importance  adds "xp:1/16:importance" to the runs and the sweep: L_x,p whose
               2,500 points per configuration are drawn from the interface
               proposal (half uniform, half (1 - u^2)^2) and weighted by
               1 / (N q), at the same force counts. Our improvement, not the
               paper's protocol; the protocol's runs are reused from the workdir.
  :improved    :importance plus "z:normalised": L_z with each latent rate
               component divided by its std over the run's labels (the squared
               error in normalised target space), at the same force counts.
               Ours, not the paper's protocol (its L_z is the plain |J f - g|^2).
"""

from configs import base


def get_config(variant: str = ""):
    c = base.get_config()
    c.seed = 0
    c.system.name = "allen_cahn"
    c.system.params.n_grid = 200
    c.system.params.interface_cells = 10.0  # eps = 10 h / (2 sqrt(2) artanh 0.9) = 0.0120
    c.system.params.r1_range = (0.30, 0.40)
    c.system.params.r2_range = (0.10, 0.15)
    c.system.params.batch_size = 4  # trajectories integrated together (cache-sized)

    # RK4, dt = 0.1 h^2 = 2.5e-6, 40,000 steps (T = 0.1), every 100th step: 400 frames.
    c.data.n_pool_trajectories = 400
    c.data.pool_integrator = "rk4"
    c.data.pool_dt = 2.5e-6
    c.data.pool_steps = 40_000
    c.data.pool_save_every = 100
    c.data.n_test_trajectories = 50
    c.data.test_integrator = "rk4"
    c.data.test_dt = 2.5e-6
    c.data.test_steps = 40_000
    c.data.test_save_every = 100
    c.data.block_trajectories = 8
    c.data.pool_keep_above = 1e-4  # drop frames after the ring has vanished (free energy <= 1e-4)

    # Encoder 40000 -> 64 -> 64 -> 15 (softplus) after the free energy; decoder from the closure.
    c.autoencoder.latent_dim = 16
    c.autoencoder.hidden = (64, 64)
    c.autoencoder.bias_init = "zeros"
    c.autoencoder.decoder_uses_observables = False
    c.autoencoder.lambda_cond = 1e-5
    c.autoencoder.cond_rows = "all"  # all 16 rows, the energy's included
    c.autoencoder.epochs = 20
    c.autoencoder.batch_size = 256
    c.autoencoder.checkpoint_every = 1  # an epoch of ~100,000 frames takes minutes

    c.model.name = "onsagernet"
    c.model.onsagernet.variant = "shared"
    c.model.onsagernet.trunk_widths = (64, 64)

    c.train.runs = ("z", "xp:1/16")
    c.train.budget = 100_000_000  # L_z: 2,500 x 40,000; L_x,p: 40,000 x 2,500
    c.train.seeds = (1, 2, 3)
    c.train.draw_configs = "random"
    c.train.shared_subsets = True  # one 40,000 x 2,500 labelling (180 MB of loss inputs) for all members
    c.train.patience = 50
    c.train.lr = 5e-3
    c.train.batch_size = 256
    c.train.epochs = 1000
    c.train.min_lr = 1e-5
    c.train.per_loss = {"xp": {"lr": 1e-3, "batch_size": 512, "epochs": 2000, "min_lr": 5e-6}}
    c.train.precompute_chunk = 256
    c.train.checkpoint_every = 50
    c.train.log_every = 10

    # Error vs force budget (experiments/sweep.py): both losses at equal counts;
    # L_z 75 ... 2,500 configurations, L_x,p 1,200 ... 40,000.
    c.sweep.runs = c.train.runs
    c.sweep.budgets = (3_000_000, 10_000_000, 30_000_000, 100_000_000)

    # Test frames are 2.5e-4 apart; the latent RK4 step is 2.5e-5, 10x the microscopic one.
    c.eval.substeps = 10
    c.eval.relative_floor = 1e-4

    if variant in ("importance", "improved"):
        c.train.runs = ("z", "xp:1/16", "xp:1/16:importance")
        if variant == "improved":
            c.train.runs = ("z", "z:normalised", "xp:1/16", "xp:1/16:importance")
        c.sweep.runs = c.train.runs
    elif variant == "smoke":
        c.system.params.n_grid = 16
        c.system.params.interface_cells = 3.0
        c.system.params.batch_size = 2
        c.data.n_pool_trajectories = 10
        c.data.n_test_trajectories = 3
        for split in ("pool", "test"):
            c.data[f"{split}_dt"] = 0.1 / 16**2
            c.data[f"{split}_steps"] = 200
            c.data[f"{split}_save_every"] = 10
        c.data.block_trajectories = 4  # three blocks, the last one short
        c.autoencoder.latent_dim = 4
        c.autoencoder.hidden = (8, 8)
        c.autoencoder.epochs = 2
        c.autoencoder.batch_size = 16
        c.model.onsagernet.trunk_widths = (8, 8)
        c.train.budget = 8 * 256  # L_z: 8 configurations; L_x,p: 128 with 16 points each
        c.train.epochs = 3
        c.train.per_loss = {"xp": {"lr": 1e-3, "batch_size": 32, "epochs": 3, "min_lr": 5e-6}}
        c.train.batch_size = 8
        c.train.precompute_chunk = 64
        c.train.checkpoint_every = 0
        c.train.log_every = 1
        c.sweep.budgets = (4 * 256, c.train.budget)
        c.eval.substeps = 2
    elif variant:
        raise ValueError(f"unknown allen_cahn config variant {variant!r}; use '', 'importance', 'improved' or 'smoke'")
    return c
