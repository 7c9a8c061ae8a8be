# The jl coefficient sweep over four decades (JL's pull on one row is ~2 jl_coeff / d_sae: docs/flags.md), on one pass:
#   python sae.py config/gpt2_sweep_jl.py
init_from = "gpt2"
loss = "jl"
jl_coeff = [1e2, 1e3, 1e4, 1e5]
out_dir = "out/gpt2_sweep_jl"
