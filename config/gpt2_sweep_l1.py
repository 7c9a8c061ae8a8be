# The l1 coefficient sweep, five SAEs on one GPT-2 pass (out/gpt2_sweep_l1/l1_coeff1.0, ...):
#   python sae.py config/gpt2_sweep_l1.py
init_from = "gpt2"
loss = "sparsity"
l1_coeff = [1.0, 2.0, 5.0, 10.0, 20.0]
out_dir = "out/gpt2_sweep_l1"
