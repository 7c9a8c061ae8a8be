# The hybrid grid: l1 coefficient x jl coefficient, nine SAEs on one pass:
#   python sae.py config/gpt2_sweep_hybrid.py
init_from = "gpt2"
loss = "hybrid"
l1_coeff = [2.0, 5.0, 10.0]
jl_coeff = [1e2, 1e3, 1e4]
out_dir = "out/gpt2_sweep_hybrid"
