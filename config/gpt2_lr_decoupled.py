# Decoupled encoder and decoder learning rates: the encoder at 1e-4, the decoder at 1x, 3x and 10x that
# (1x is the coupled baseline); hybrid loss; three SAEs on one pass (out/gpt2_lr_decoupled/lr_dec0.0001, ...):
#   python sae.py config/gpt2_lr_decoupled.py
init_from = "gpt2"
loss = "hybrid"
lr_enc = 1e-4
lr_dec = [1e-4, 3e-4, 1e-3]
out_dir = "out/gpt2_lr_decoupled"
