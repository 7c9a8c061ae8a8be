# Decoupled encoder and decoder learning rates, the decoder 10x faster; hybrid loss:
#   python sae.py config/gpt2_lr_decoupled.py
#   python sae.py config/gpt2_lr_decoupled.py --lr_dec=3e-4 --out_dir=out/gpt2_lr_dec3e-4   # one point of its sweep
init_from = "gpt2"
loss = "hybrid"
lr_enc = 1e-4
lr_dec = 1e-3
out_dir = "out/gpt2_lr_decoupled"
