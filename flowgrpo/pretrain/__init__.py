"""The embedded Shapes base models (a small SD3-format flow model and an aMUSEd-format masked diffusion model): their
architecture, training data and the pretraining that makes them (`flowgrpo pretrain-shapes`)."""
